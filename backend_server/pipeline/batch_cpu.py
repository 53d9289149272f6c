"""Batch reconstruction on the CPU: the whole pipeline per photo (or per person: `run_person`), in
this process (`workers=1`) or in a pool of spawned processes, each with its own Reconstructor
(models loaded once per process). With `devices`, worker k's Reconstructor bakes on devices[k]
(the people of a GPU batch)."""
from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from shared_protocol import PersonPhoto, ProtocolError, ReconstructOptions
from .batch import (BatchReport, OutcomeCallback, OutcomeStatus, Person, PhotoOutcome, ignore_sigint_in_children,
                    sigint_ignored, write_photo)
from .reconstruct import Reconstructor

_reconstructor: Reconstructor | None = None         # one per worker process (or this one)


def _worker_init(options: ReconstructOptions, in_pool: bool = True, devices: Any = None) -> None:
    """devices: None (the CPU), or a queue from which each worker takes its device."""
    global _reconstructor
    if in_pool:
        ignore_sigint_in_children()
    _reconstructor = Reconstructor("cpu" if devices is None else devices.get())
    _reconstructor.warm_up(options.texture_size, options.subdivision, (options.model,))


def _worker_run(task: tuple[Path | Person, str, Path, ReconstructOptions]) -> PhotoOutcome:
    item, stem, out_dir, options = task
    if isinstance(item, Person):
        return _run_person(item, stem, out_dir, options)
    photo = item
    assert _reconstructor is not None, "_worker_init runs first"
    start = time.perf_counter()
    try:
        data = photo.read_bytes()
        result = _reconstructor.run(data, stem + photo.suffix, options)
        write_photo(out_dir, result.files)
        return PhotoOutcome(photo, OutcomeStatus.DONE, f"{len(result.faces)} face(s)", time.perf_counter() - start,
                            stem, result.timings_ms)
    except ProtocolError as exc:
        return PhotoOutcome(photo, OutcomeStatus.FAILED, f"{exc.code.value}: {exc.message}",
                            time.perf_counter() - start)
    except OSError as exc:
        return PhotoOutcome(photo, OutcomeStatus.FAILED, f"cannot read or write: {exc}", time.perf_counter() - start)


def _run_person(person: Person, stem: str, out_dir: Path, options: ReconstructOptions) -> PhotoOutcome:
    assert _reconstructor is not None, "_worker_init runs first"
    start = time.perf_counter()
    try:
        photos = [PersonPhoto(path.name, path.read_bytes()) for path in person.photos]
        result = _reconstructor.run_person(photos, options, name=stem)
        write_photo(out_dir, list(result.files))
        left = "".join(f"; left out {photos[k].name}: {why}" for k, why in result.fit.left_out.items())
        return PhotoOutcome(person.source, OutcomeStatus.DONE, f"1 head from {len(result.kept)} of {len(photos)} "
                            f"photos{left}", time.perf_counter() - start, stem, result.timings_ms)
    except ProtocolError as exc:
        return PhotoOutcome(person.source, OutcomeStatus.FAILED, f"{exc.code.value}: {exc.message}",
                            time.perf_counter() - start)
    except OSError as exc:
        return PhotoOutcome(person.source, OutcomeStatus.FAILED, f"cannot read or write: {exc}",
                            time.perf_counter() - start)


class CpuBatchRunner:
    """Runs photos (or people) through the whole pipeline on `workers` processes: on the CPU, or
    with `devices`, one process per device baking there."""

    def __init__(self, options: ReconstructOptions, workers: int = 1, devices: list[str] | None = None) -> None:
        self.options = options
        self.workers = max(1, workers) if devices is None else len(devices)
        self.devices = devices

    def run(self, photos: Sequence[tuple[Path | Person, str]], out_dir: Path, on_outcome: OutcomeCallback
            ) -> BatchReport:
        report = BatchReport()
        start = time.perf_counter()
        tasks = [(photo, stem, out_dir, self.options) for photo, stem in photos]
        if not tasks:
            return report
        workers = min(self.workers, len(tasks))
        pool = None
        results: Iterator[PhotoOutcome]
        context = multiprocessing.get_context("spawn")
        if workers <= 1 and self.devices is None:
            _worker_init(self.options, in_pool=False)
            results = map(_worker_run, tasks)
        else:
            devices = None
            if self.devices is not None:
                workers = len(self.devices)
                devices = context.Manager().Queue()
                for device in self.devices:
                    devices.put(device)
            with sigint_ignored():
                pool = context.Pool(workers, _worker_init, (self.options, True, devices))
            results = pool.imap_unordered(_worker_run, tasks)
        try:
            for outcome in results:
                if outcome.status is OutcomeStatus.DONE:
                    report.count_done(outcome)
                on_outcome(outcome)
        except KeyboardInterrupt:
            if pool is not None:
                pool.terminate()                     # the workers ignore Ctrl+C: stop them now
            raise
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        report.seconds = time.perf_counter() - start
        return report

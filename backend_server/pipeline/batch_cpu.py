"""Batch reconstruction on the CPU: the whole pipeline per photo, in this process (`workers=1`) or
in a pool of spawned processes, each with its own Reconstructor (models loaded once per process)."""
from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Iterator, Sequence

from shared_protocol import ProtocolError, ReconstructOptions
from .batch import (BatchReport, OutcomeCallback, OutcomeStatus, PhotoOutcome, ignore_sigint_in_children,
                    sigint_ignored, write_photo)
from .reconstruct import Reconstructor

_reconstructor: Reconstructor | None = None         # one per worker process (or this one)


def _worker_init(options: ReconstructOptions, in_pool: bool = True) -> None:
    global _reconstructor
    if in_pool:
        ignore_sigint_in_children()
    _reconstructor = Reconstructor()
    _reconstructor.warm_up(options.texture_size, options.subdivision, (options.model,))


def _worker_run(task: tuple[Path, str, Path, ReconstructOptions]) -> PhotoOutcome:
    photo, stem, out_dir, options = task
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


class CpuBatchRunner:
    """Runs photos through the whole pipeline on `workers` CPU processes."""

    def __init__(self, options: ReconstructOptions, workers: int = 1) -> None:
        self.options = options
        self.workers = max(1, workers)

    def run(self, photos: Sequence[tuple[Path, str]], out_dir: Path, on_outcome: OutcomeCallback) -> BatchReport:
        report = BatchReport()
        start = time.perf_counter()
        tasks = [(photo, stem, out_dir, self.options) for photo, stem in photos]
        if not tasks:
            return report
        workers = min(self.workers, len(tasks))
        pool = None
        results: Iterator[PhotoOutcome]
        if workers <= 1:
            _worker_init(self.options, in_pool=False)
            results = map(_worker_run, tasks)
        else:
            with sigint_ignored():
                pool = multiprocessing.get_context("spawn").Pool(workers, _worker_init, (self.options,))
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

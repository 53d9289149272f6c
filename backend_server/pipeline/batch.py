"""Batch reconstruction of many photos into an output folder: what every batch path reports, and
the one entry point that picks the path for the devices asked for.

    run_batch(["cpu"], photos, out_dir, options, on_outcome, workers=2)      # batch_cpu: a process pool
    run_batch(["cuda:0", "cuda:1"], photos, out_dir, options, on_outcome)   # batch_gpu: GPUs + CPU pool

`photos` are (path, output stem) pairs; each photo's files are written as `stem.*` (or
`stem_faceK.*` for options.face == -1), and `on_outcome` hears of each photo as it ends. An item
may be a `Person` instead of a path: its photos make one head (`Reconstructor.run_person`), written
as `stem.*`; on GPUs people run whole on each GPU's process (one per device), as the CPU path runs
them, since a person's photos must be fitted together.

A photo's files are written one by one (each through a temporary `.NAME.part` renamed into
place), every JSON after every other file and the first face's JSON last: that one is the
photo's *marker*. `photo_is_done` counts a photo as done only when its marker and every file it
implies are there, so a batch stopped at any moment (Ctrl+C, a crash, a full disk) leaves no
photo that a re-run would take for finished. On Ctrl+C the batch paths stop their worker
processes at once and raise KeyboardInterrupt; `remove_partial_files` clears the `.part` files
that a killed writer left.
"""
from __future__ import annotations

import enum
import json
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from shared_protocol import ReconstructOptions, ResultFile
from shared_protocol.shape_keys import NEUTRAL_SUFFIX, SUFFIX as SHAPE_KEYS_SUFFIX
from .export import write_files


class OutcomeStatus(enum.Enum):
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class PhotoOutcome:
    """What became of one photo in a batch run (any path). detail: for DONE the face count, for
    FAILED `code: message`, for SKIPPED why."""

    photo: Path
    status: OutcomeStatus
    detail: str = ""
    seconds: float = 0.0
    stem: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)


OutcomeCallback = Callable[[PhotoOutcome], None]


@dataclass(frozen=True)
class Person:
    """Several photos of one person for a batch: one head from all of them. source: what the
    outcome names (the person's folder, or the first photo)."""

    photos: tuple[Path, ...]
    source: Path


@dataclass
class BatchReport:
    """What a batch run measured: throughput and, per GPU, fit and bake time and peak memory."""

    photos: int = 0
    faces: int = 0
    seconds: float = 0.0
    gpu: dict[str, dict[str, float]] = field(default_factory=dict)   # device -> bake_s, fit_s, batches, faces, peak_mb
    cpu_stage_ms: dict[str, float] = field(default_factory=dict)     # summed over photos

    @property
    def photos_per_s(self) -> float:
        return self.photos / self.seconds if self.seconds else 0.0

    def count_done(self, outcome: PhotoOutcome) -> None:
        self.photos += 1
        for stage, ms in outcome.timings_ms.items():
            self.cpu_stage_ms[stage] = self.cpu_stage_ms.get(stage, 0.0) + ms


def run_batch(devices: Sequence[str], photos: Sequence[tuple[Path | Person, str]], out_dir: Path,
              options: ReconstructOptions, on_outcome: OutcomeCallback, workers: int = 1,
              batch_size: int = 16) -> BatchReport:
    """Reconstruct every photo (or person) on the CPU (`workers` processes) or on CUDA devices
    (photos: batches of `batch_size` faces per GPU, the CPU stages on the other cores; people: a
    process per GPU, each running whole people with its GPU's baker)."""
    if list(devices) == ["cpu"]:
        from .batch_cpu import CpuBatchRunner
        return CpuBatchRunner(options, workers).run(photos, out_dir, on_outcome)
    if any(isinstance(item, Person) for item, _ in photos):
        from .batch_cpu import CpuBatchRunner
        return CpuBatchRunner(options, len(devices), list(devices)).run(photos, out_dir, on_outcome)
    from .batch_gpu import GpuBatchRunner
    return GpuBatchRunner(list(devices), options, batch_size).run(
        [(item, stem) for item, stem in photos if isinstance(item, Path)], out_dir, on_outcome)


def marker_name(stem: str, options: ReconstructOptions) -> str:
    """The file whose presence says a photo may be done: its (first) face's JSON."""
    return f"{stem}.json" if options.face != -1 else f"{stem}_face0.json"


def write_photo(out_dir: Path, files: Sequence[ResultFile]) -> None:
    """Write one photo's files (all its faces', in face order) with the marker last."""
    jsons = [f for f in files if f.kind == "json"]
    write_files(out_dir, [f for f in files if f.kind != "json"] + jsons[::-1])


def photo_is_done(out_dir: Path, stem: str, options: ReconstructOptions) -> bool:
    """True when the photo's marker is there and so is every file it implies: for each of its
    faces (the marker's `face.of` with --face all) the JSON and the outputs asked for."""
    marker = out_dir / marker_name(stem, options)
    try:
        faces = json.loads(marker.read_text())["face"]["of"] if options.face == -1 else 1
    except (OSError, ValueError, KeyError, TypeError):
        return False
    names = [stem] if options.face != -1 else [f"{stem}_face{k}" for k in range(int(faces))]
    for name in names:
        try:
            mesh = json.loads((out_dir / f"{name}.json").read_text()).get("mesh", {})
        except (OSError, ValueError, AttributeError):
            return False
        wanted = [f"{name}.{kind}" for kind in ("obj", "mtl", "png", "glb", "usdc") if kind in options.outputs]
        if "neutral_obj" in options.outputs and mesh.get("neutral_file"):
            wanted.append(f"{name}{NEUTRAL_SUFFIX}")
        if "shape_keys" in options.outputs and mesh.get("shape_keys_file"):
            wanted.append(f"{name}{SHAPE_KEYS_SUFFIX}")
        if not all((out_dir / file).is_file() and (out_dir / file).stat().st_size for file in wanted):
            return False
    return True


def remove_partial_files(out_dir: Path) -> int:
    """Delete the `.NAME.part` files a writer killed mid-file left in out_dir; returns how many."""
    partial = list(Path(out_dir).glob(".*.part")) if Path(out_dir).is_dir() else []
    for path in partial:
        path.unlink(missing_ok=True)
    return len(partial)


def ignore_sigint_in_children() -> None:
    """A worker process's first step: Ctrl+C goes to the whole process group, and only the main
    process acts on it (it stops the workers itself; a worker dying of it would leave its pool
    waiting forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class CtrlC:
    """Ctrl+C during a batch, noted as well as raised. Python drops an exception that a signal
    handler raises while a `__del__` or a callback runs ("Exception ignored in ..."), so a bare
    KeyboardInterrupt can vanish and the batch run on to the end; the runner calls `check` after
    each photo and once more at the end. Use in the main thread, around the whole batch."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def __enter__(self) -> CtrlC:
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handler(self, signum: int, frame: object) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl+C while starting worker processes: a spawned child inherits the ignored signal
    from its first instruction on, before its initializer runs."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

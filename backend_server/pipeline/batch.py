"""Batch reconstruction of many photos into an output folder: what every batch path reports, and
the one entry point that picks the path for the devices asked for.

    run_batch(["cpu"], photos, out_dir, options, on_outcome, workers=2)      # batch_cpu: a process pool
    run_batch(["cuda:0", "cuda:1"], photos, out_dir, options, on_outcome)   # batch_gpu: GPUs + CPU pool

`photos` are (path, output stem) pairs; each photo's files are written as `stem.*` (or
`stem_faceK.*` for options.face == -1), and `on_outcome` hears of each photo as it ends.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from shared_protocol import ReconstructOptions


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


def run_batch(devices: Sequence[str], photos: Sequence[tuple[Path, str]], out_dir: Path, options: ReconstructOptions,
              on_outcome: OutcomeCallback, workers: int = 1, batch_size: int = 16) -> BatchReport:
    """Reconstruct every photo on the CPU (`workers` processes) or on CUDA devices (batches of
    `batch_size` faces per GPU, the CPU stages on the other cores)."""
    if list(devices) == ["cpu"]:
        from .batch_cpu import CpuBatchRunner
        return CpuBatchRunner(options, workers).run(photos, out_dir, on_outcome)
    from .batch_gpu import GpuBatchRunner
    return GpuBatchRunner(list(devices), options, batch_size).run(photos, out_dir, on_outcome)

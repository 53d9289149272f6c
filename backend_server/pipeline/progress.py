"""Stage progress and timing: the callback told as each stage starts, and each stage's time.

`on_stage(stage, fraction)` is called as a stage starts (fraction: of the whole job, 0..1); it may
raise (e.g. ProtocolError CANCELLED) to stop the job at that stage boundary.
"""
from __future__ import annotations

import time
from typing import Callable

StageCallback = Callable[[str, float], None]


class StageClock:
    """Tells `on_stage` as each stage starts and sums each stage's wall time in `timings` (ms)."""

    def __init__(self, on_stage: StageCallback | None = None, timings: dict[str, float] | None = None) -> None:
        self.on_stage = on_stage
        self.timings: dict[str, float] = dict(timings or {})
        self._current: tuple[str, float] | None = None

    def enter(self, stage: str, fraction: float) -> None:
        self.stop()
        if self.on_stage:
            self.on_stage(stage, fraction)
        self._current = (stage, time.perf_counter())

    def stop(self) -> None:
        if self._current:
            stage, start = self._current
            self.timings[stage] = self.timings.get(stage, 0.0) + (time.perf_counter() - start) * 1000
            self._current = None

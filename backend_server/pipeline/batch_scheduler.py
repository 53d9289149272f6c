"""The GPU batch path's decisions, with no processes, queues or I/O (batch_gpu.py carries them out).

A photo goes: to prepare -> preparing (CPU pool: decode, detect, landmarks; its pixels go to a
shared-memory segment) -> its faces wait for a GPU -> in batches of up to `batch_size` faces on
a GPU (fit and bake; each face's texture lands in a shared-memory *slot*) -> exporting (CPU pool)
-> ended, done or failed. A photo's faces may travel in different batches, even on different GPUs.

`BatchScheduler` is told what happened (`prepared`, `prepare_failed`, the GPU messages,
`gpu_died`, `exported`, `export_failed`) and answers with what to do (`Prepare`, `SendBatch`,
`Export`, `ReleasePixels`, `Finish`); `next_actions` hands out the work that may start now:
photos to prepare (bounded ahead of the GPUs: back-pressure) and batches for GPUs with room.
Its promises, tested in tests/test_batch_scheduler.py:
- every photo ends exactly once; a photo is exported only when all its faces are baked;
- a photo's pixels are released once, when no GPU will read them again;
- every slot returns to the free list once its texture is exported or abandoned;
- a GPU that dies fails the photos of its batches in flight, and with no GPU left every photo
  not yet baked fails; at most `batches_in_flight` batches wait on a GPU.

The messages between the main process and the GPU processes are the frozen dataclasses below.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

from ..geometry import Camera
from ..models.face_model import FaceFit
from .batch import BatchReport, OutcomeStatus

if TYPE_CHECKING:
    from .lighting import Lighting

PixelsRef = tuple[str, tuple[int, ...]]      # a shared-memory segment's name and the (H, W, 3) shape in it


# --- messages: main process <-> GPU process ---------------------------------------------------------
@dataclass(frozen=True)
class BatchJob:
    """main -> GPU: fit and bake these faces; face k's photo pixels, camera, landmarks ((478, 3)
    photo pixels) and the slot its texture goes to."""

    batch_id: int
    pixels: tuple[PixelsRef, ...]
    cameras: tuple[Camera, ...]
    landmarks: tuple[np.ndarray, ...]
    slots: tuple[str, ...]
    lit_texture: bool = False                 # keep the photo's light in the textures


@dataclass(frozen=True)
class GpuReady:
    device: str


@dataclass(frozen=True)
class GpuDead:
    """The GPU process could not start (no GPU, the plugin did not build, ...)."""

    device: str
    message: str


@dataclass(frozen=True)
class BatchBaked:
    """GPU -> main: per face (in the job's order) its fit and its texture's seen and mirrored
    fractions; the batch's fit and bake seconds and the process's peak GPU memory (MiB)."""

    batch_id: int
    fits: tuple[FaceFit, ...]
    fractions: tuple[tuple[float, float], ...]
    fit_s: float
    bake_s: float
    peak_mb: float
    lightings: tuple[Lighting, ...] = ()     # per face, for its JSON (empty: none measured)


@dataclass(frozen=True)
class BatchFailed:
    batch_id: int
    message: str


GpuMessage = Union[GpuReady, GpuDead, BatchBaked, BatchFailed]


# --- actions: what the scheduler asks the runner to do -----------------------------------------------
@dataclass(frozen=True)
class Prepare:
    photo: int


@dataclass(frozen=True)
class BatchMember:
    photo: int
    face: int
    slot: str


@dataclass(frozen=True)
class SendBatch:
    batch_id: int
    device: str
    members: tuple[BatchMember, ...]


@dataclass(frozen=True)
class BakedFace:
    """A face's texture in `slot`, its fit, and its share of its batch's fit and bake time."""

    slot: str
    fit: FaceFit
    seen_fraction: float
    mirrored_fraction: float
    fit_ms: float
    bake_ms: float
    lighting: Lighting | None = None


@dataclass(frozen=True)
class Export:
    photo: int
    faces: tuple[BakedFace, ...]          # in face order


@dataclass(frozen=True)
class ReleasePixels:
    photo: int


@dataclass(frozen=True)
class Finish:
    photo: int
    status: OutcomeStatus
    detail: str


Action = Union[Prepare, SendBatch, Export, ReleasePixels, Finish]


@dataclass
class _Photo:
    faces: int | None = None                       # known once prepared
    has_pixels: bool = False
    at_gpu: int = 0                                # faces in batches a GPU has not answered
    baked: dict[int, BakedFace] = field(default_factory=dict)
    exporting: bool = False
    ended: bool = False


class BatchScheduler:
    """See the module docstring. Photos are numbered 0..photo_count-1; slots are opaque names."""

    def __init__(self, photo_count: int, devices: Sequence[str], slots: Sequence[str], batch_size: int,
                 cpu_workers: int, batches_in_flight: int = 2) -> None:
        self.batch_size = batch_size
        self.batches_in_flight = batches_in_flight
        self.max_preparing = 2 * cpu_workers
        self.photos = [_Photo() for _ in range(photo_count)]
        self.todo = deque(range(photo_count))
        self.preparing = 0
        self.waiting: deque[tuple[int, int]] = deque()          # (photo, face) prepared, not yet at a GPU
        self.free_slots = deque(slots)
        self.in_flight: dict[int, tuple[str, tuple[BatchMember, ...]]] = {}
        self.ready: set[str] = set()
        self.alive = set(devices)
        self.remaining = photo_count
        self.report = BatchReport(gpu={d: {"bake_s": 0.0, "fit_s": 0.0, "batches": 0, "faces": 0, "peak_mb": 0.0}
                                       for d in devices})
        self._batch_ids = itertools.count()

    @property
    def finished(self) -> bool:
        return self.remaining == 0

    # --- work that may start now -----------------------------------------------------------------
    def next_actions(self) -> list[Action]:
        if not self.alive:
            return self._fail_unbaked("worker_failed: no GPU worker is left")
        actions: list[Action] = []
        while (self.todo and self.preparing < self.max_preparing
               and len(self.waiting) < 4 * self.batch_size * len(self.alive)):
            actions.append(Prepare(self.todo.popleft()))
            self.preparing += 1
        while candidates := [d for d in self.alive if self._may_send(d)]:
            actions.append(self._make_batch(min(candidates, key=lambda d: (self._busy(d), d))))   # least busy
        return actions

    def _busy(self, device: str) -> int:
        return sum(1 for d, _ in self.in_flight.values() if d == device)

    def _may_send(self, device: str) -> bool:
        tail = not self.todo and self.preparing == 0           # no more faces can come: send what waits
        return (device in self.ready and self._busy(device) < self.batches_in_flight and bool(self.waiting)
                and (len(self.waiting) >= self.batch_size or tail)
                and len(self.free_slots) >= min(self.batch_size, len(self.waiting)))

    def _make_batch(self, device: str) -> SendBatch:
        count = min(self.batch_size, len(self.waiting))
        members = []
        for _ in range(count):
            photo, face = self.waiting.popleft()
            self.photos[photo].at_gpu += 1
            members.append(BatchMember(photo, face, self.free_slots.popleft()))
        batch = SendBatch(next(self._batch_ids), device, tuple(members))
        self.in_flight[batch.batch_id] = (device, batch.members)
        return batch

    # --- CPU pool events ---------------------------------------------------------------------------
    def prepared(self, photo: int, face_count: int) -> list[Action]:
        """The photo's faces are located and its pixels are in shared memory."""
        self.preparing -= 1
        state = self.photos[photo]
        state.has_pixels = True
        if state.ended:                              # failed meanwhile (no GPU left): only free its pixels
            return self._release(photo)
        if face_count == 0:                          # (the detect stage refuses such photos already)
            return self._finish(photo, OutcomeStatus.FAILED, "no_face: no face to reconstruct")
        state.faces = face_count
        self.waiting.extend((photo, face) for face in range(face_count))
        self.report.faces += face_count
        return []

    def prepare_failed(self, photo: int, detail: str) -> list[Action]:
        self.preparing -= 1
        return self._finish(photo, OutcomeStatus.FAILED, detail)

    def exported(self, photo: int) -> list[Action]:
        state = self.photos[photo]
        self.free_slots.extend(face.slot for face in state.baked.values())
        state.baked.clear()
        return self._finish(photo, OutcomeStatus.DONE, f"{state.faces} face(s)")

    def export_failed(self, photo: int, detail: str) -> list[Action]:
        return self._finish(photo, OutcomeStatus.FAILED, detail)

    # --- GPU events --------------------------------------------------------------------------------
    def on_gpu_message(self, message: GpuMessage) -> list[Action]:
        if isinstance(message, GpuReady):
            self.ready.add(message.device)
            return []
        if isinstance(message, BatchFailed):
            device = self.in_flight[message.batch_id][0]
            return self._abandon(message.batch_id, f"internal: bake on {device} failed: {message.message}")
        if isinstance(message, BatchBaked):
            return self._baked(message)
        raise ValueError(f"the runner handles {type(message).__name__} itself")

    def gpu_died(self, device: str) -> list[Action]:
        """The GPU process ended: its batches in flight are lost."""
        self.alive.discard(device)
        self.ready.discard(device)
        actions: list[Action] = []
        for batch_id in [b for b, (d, _) in self.in_flight.items() if d == device]:
            actions += self._abandon(batch_id, f"worker_failed: the GPU worker on {device} died")
        return actions

    def _baked(self, message: BatchBaked) -> list[Action]:
        device, members = self.in_flight.pop(message.batch_id)
        gpu = self.report.gpu[device]
        gpu["bake_s"] += message.bake_s
        gpu["fit_s"] += message.fit_s
        gpu["batches"] += 1
        gpu["faces"] += len(members)
        gpu["peak_mb"] = max(gpu["peak_mb"], message.peak_mb)
        share = 1000.0 / len(members)
        actions: list[Action] = []
        lightings = message.lightings or (None,) * len(members)
        for member, fit, (seen, mirrored), lighting in zip(members, message.fits, message.fractions, lightings):
            state = self.photos[member.photo]
            state.at_gpu -= 1
            if state.ended:                          # failed meanwhile (another batch of it): drop the texture
                self.free_slots.append(member.slot)
            else:
                state.baked[member.face] = BakedFace(member.slot, fit, seen, mirrored, message.fit_s * share,
                                                     message.bake_s * share, lighting)
            actions += self._release_if_done(member.photo)
        for photo in dict.fromkeys(member.photo for member in members):
            state = self.photos[photo]
            if not state.ended and not state.exporting and len(state.baked) == state.faces:
                state.exporting = True
                actions.append(Export(photo, tuple(state.baked[k] for k in range(state.faces))))
        return actions

    def _abandon(self, batch_id: int, detail: str) -> list[Action]:
        """A batch its GPU will not deliver: its slots are free again and its photos fail."""
        _, members = self.in_flight.pop(batch_id)
        actions: list[Action] = []
        for member in members:
            self.free_slots.append(member.slot)
            self.photos[member.photo].at_gpu -= 1
        for photo in dict.fromkeys(member.photo for member in members):
            actions += self._finish(photo, OutcomeStatus.FAILED, detail)
            actions += self._release_if_done(photo)
        return actions

    # --- endings -----------------------------------------------------------------------------------
    def _fail_unbaked(self, detail: str) -> list[Action]:
        """No GPU is left: every photo not yet baked fails (photos being exported still finish)."""
        actions: list[Action] = []
        unbaked = [*self.todo, *(photo for photo, _ in self.waiting),
                   *(p for p, state in enumerate(self.photos) if state.faces is None and not state.ended)]
        self.todo.clear()
        self.waiting.clear()
        for photo in dict.fromkeys(unbaked):
            actions += self._finish(photo, OutcomeStatus.FAILED, detail)
        return actions

    def _finish(self, photo: int, status: OutcomeStatus, detail: str) -> list[Action]:
        state = self.photos[photo]
        if state.ended:
            return []
        state.ended = True
        self.remaining -= 1
        if status is OutcomeStatus.FAILED:           # textures already baked for it are not needed
            self.free_slots.extend(face.slot for face in state.baked.values())
            state.baked.clear()
        return [*self._release_if_done(photo), Finish(photo, status, detail)]

    def _release_if_done(self, photo: int) -> list[Action]:
        """Free a photo's pixels once no GPU will read them: none of its faces is at a GPU, and it
        has ended or every face is baked."""
        state = self.photos[photo]
        all_baked = state.faces is not None and len(state.baked) == state.faces
        if state.has_pixels and state.at_gpu == 0 and (state.ended or all_baked):
            return self._release(photo)
        return []

    def _release(self, photo: int) -> list[Action]:
        self.photos[photo].has_pixels = False
        return [ReleasePixels(photo)]

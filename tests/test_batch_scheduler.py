"""The GPU batch path's scheduler on a CPU: fake GPU messages, no processes (batch_scheduler.py)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from backend_server.geometry import Camera, Pose
from backend_server.models.face_model import FaceFit
from backend_server.pipeline.batch import OutcomeStatus
from backend_server.pipeline.batch_scheduler import (BatchBaked, BatchFailed, BatchScheduler, Export, Finish,
                                                     GpuReady, Prepare, ReleasePixels, SendBatch)

FIT = FaceFit(Pose(np.eye(3), np.zeros(3)), Camera.for_photo(64, 64), np.zeros((468, 3)))


class Harness:
    """Plays the runner: keeps every action, and checks the scheduler's promises at the end."""

    def __init__(self, faces_per_photo: list[int], devices=("cuda:0",), batch_size=2, slots=6, cpu_workers=2):
        self.faces = faces_per_photo
        self.slots = [f"slot{k}" for k in range(slots)]
        self.scheduler = BatchScheduler(len(faces_per_photo), list(devices), self.slots, batch_size, cpu_workers)
        self.actions: list = []
        self.preparing: list[int] = []
        self.batches: dict[int, SendBatch] = {}
        self.exports: list[Export] = []

    def take(self, actions: list) -> list:
        self.actions += actions
        for action in actions:
            if isinstance(action, Prepare):
                self.preparing.append(action.photo)
            elif isinstance(action, SendBatch):
                self.batches[action.batch_id] = action
            elif isinstance(action, Export):
                self.exports.append(action)
        return actions

    def step(self) -> list:
        return self.take(self.scheduler.next_actions())

    def prepare_all(self) -> None:
        while self.preparing:
            photo = self.preparing.pop(0)
            self.take(self.scheduler.prepared(photo, self.faces[photo]))

    def bake(self, batch_id: int) -> list:
        batch = self.batches.pop(batch_id)
        count = len(batch.members)
        return self.take(self.scheduler.on_gpu_message(BatchBaked(
            batch_id, (FIT,) * count, ((0.8, 0.1),) * count, fit_s=0.01, bake_s=0.04, peak_mb=100.0)))

    def export_all(self) -> None:
        while self.exports:
            self.take(self.scheduler.exported(self.exports.pop(0).photo))

    def finishes(self) -> Counter:
        return Counter(a.photo for a in self.actions if isinstance(a, Finish))

    def status(self, photo: int) -> OutcomeStatus:
        [finish] = [a for a in self.actions if isinstance(a, Finish) and a.photo == photo]
        return finish.status

    def check_promises(self) -> None:
        scheduler = self.scheduler
        assert scheduler.finished
        assert set(self.finishes().values()) == {1}, "every photo ends exactly once"
        assert len(self.finishes()) == len(self.faces)
        releases = Counter(a.photo for a in self.actions if isinstance(a, ReleasePixels))
        assert set(releases.values()) <= {1}, "pixels are released at most once"
        prepared = {p for p, state in enumerate(scheduler.photos) if state.faces is not None}
        assert prepared <= set(releases), "every prepared photo's pixels are released"
        assert sorted(scheduler.free_slots) == sorted(self.slots), "every slot is free again"
        assert not scheduler.in_flight and not scheduler.waiting


def test_photos_flow_through_batches_and_are_exported_when_every_face_is_baked():
    h = Harness([1, 3, 1], batch_size=2, slots=6)
    h.step()
    assert h.preparing == [0, 1, 2]
    h.prepare_all()
    assert not h.step(), "no batch before the GPU is ready"
    h.take(h.scheduler.on_gpu_message(GpuReady("cuda:0")))
    sent = [a for a in h.step() if isinstance(a, SendBatch)]
    assert [len(b.members) for b in sent] == [2, 2], "two full batches, at most two in flight"
    first, second = sent
    assert {m.photo for m in first.members} == {0, 1} and {m.photo for m in second.members} == {1}
    h.bake(first.batch_id)
    assert [e.photo for e in h.exports] == [0], "photo 1 still has faces at the GPU"
    assert ReleasePixels(1) not in h.actions
    h.bake(second.batch_id)
    assert [e.photo for e in h.exports] == [0, 1]
    assert ReleasePixels(1) in h.actions
    assert [face.bake_ms for face in h.exports[1].faces] == pytest.approx([20.0, 20.0, 20.0])
    h.export_all()
    [tail] = [a for a in h.step() if isinstance(a, SendBatch)]
    assert [m.photo for m in tail.members] == [2], "the last, partial batch goes once nothing more can come"
    h.bake(tail.batch_id)
    h.export_all()
    assert all(h.status(p) is OutcomeStatus.DONE for p in range(3))
    h.check_promises()
    assert h.scheduler.report.faces == 5 and h.scheduler.report.gpu["cuda:0"]["batches"] == 3


def test_a_gpu_dying_with_batches_in_flight_fails_their_photos_and_the_other_gpu_goes_on():
    h = Harness([1] * 8, devices=("cuda:0", "cuda:1"), batch_size=2, slots=10, cpu_workers=4)
    h.step()
    h.prepare_all()
    for device in ("cuda:0", "cuda:1"):
        h.take(h.scheduler.on_gpu_message(GpuReady(device)))
    sent = [a for a in h.step() if isinstance(a, SendBatch)]
    assert Counter(b.device for b in sent) == {"cuda:0": 2, "cuda:1": 2}
    lost = {m.photo for b in sent if b.device == "cuda:0" for m in b.members}
    h.take(h.scheduler.gpu_died("cuda:0"))
    for photo in lost:
        assert h.status(photo) is OutcomeStatus.FAILED and ReleasePixels(photo) in h.actions
    assert "GPU worker on cuda:0 died" in next(a.detail for a in h.actions if isinstance(a, Finish))
    for batch in [b for b in sent if b.device == "cuda:1"]:
        h.bake(batch.batch_id)
    h.export_all()
    while not h.scheduler.finished:
        h.step()
        h.prepare_all()
        for batch_id in list(h.batches):
            assert h.batches[batch_id].device == "cuda:1"
            h.bake(batch_id)
        h.export_all()
    assert sum(h.status(p) is OutcomeStatus.DONE for p in range(8)) == 8 - len(lost)
    h.check_promises()


def test_a_photo_whose_second_batch_fails_fails_once_and_gives_back_its_first_batches_slot():
    h = Harness([3, 1], batch_size=2, slots=4)
    h.step()
    h.prepare_all()
    h.take(h.scheduler.on_gpu_message(GpuReady("cuda:0")))
    first, second = [a for a in h.step() if isinstance(a, SendBatch)]
    h.bake(first.batch_id)                               # photo 0's faces 0 and 1 baked, face 2 still out
    h.take(h.scheduler.on_gpu_message(BatchFailed(second.batch_id, "CUDA error: out of memory")))
    assert h.status(0) is OutcomeStatus.FAILED and "out of memory" in next(
        a.detail for a in h.actions if isinstance(a, Finish) and a.photo == 0)
    assert h.status(1) is OutcomeStatus.FAILED           # its face shared the failed batch
    assert not h.exports and h.actions.count(ReleasePixels(0)) == 1
    h.check_promises()                                    # the slots of photo 0's baked faces are free again


def test_a_face_baked_after_its_photo_failed_frees_its_slot_and_nothing_is_exported():
    h = Harness([3], batch_size=2, slots=4)
    h.step()
    h.prepare_all()
    h.take(h.scheduler.on_gpu_message(GpuReady("cuda:0")))
    first, second = [a for a in h.step() if isinstance(a, SendBatch)]
    h.take(h.scheduler.on_gpu_message(BatchFailed(first.batch_id, "boom")))
    assert ReleasePixels(0) not in h.actions, "its other batch still reads the pixels"
    h.bake(second.batch_id)
    assert not h.exports and ReleasePixels(0) in h.actions
    h.check_promises()


def test_back_pressure_bounds_photos_in_preparation_waiting_faces_and_batches_in_flight():
    h = Harness([1] * 100, batch_size=4, slots=12, cpu_workers=2)
    assert len(h.step()) == 4, "at most 2 per CPU worker in preparation"
    h.prepare_all()
    for _ in range(10):                                  # GPU not ready: faces pile up to 4 batches' worth
        h.step()
        h.prepare_all()
    assert len(h.scheduler.waiting) == 16 and len(h.scheduler.todo) == 84
    h.take(h.scheduler.on_gpu_message(GpuReady("cuda:0")))
    sent = [a for a in h.step() if isinstance(a, SendBatch)]
    assert len(sent) == 2, "two batches in flight per GPU"
    assert not [a for a in h.step() if isinstance(a, SendBatch)]
    h.bake(sent[0].batch_id)
    assert len([a for a in h.step() if isinstance(a, SendBatch)]) == 1     # into the last 4 free slots
    h.bake(sent[1].batch_id)
    assert not h.scheduler.free_slots
    assert not [a for a in h.step() if isinstance(a, SendBatch)], "baked textures hold their slots until exported"
    h.export_all()
    assert [len(a.members) for a in h.step() if isinstance(a, SendBatch)] == [4]


def test_with_no_gpu_left_every_unbaked_photo_fails_and_an_exporting_one_still_finishes():
    h = Harness([1, 1, 1, 1, 1], batch_size=1, slots=3, cpu_workers=1)
    h.step()                                             # photos 0 and 1 in preparation
    h.take(h.scheduler.prepared(0, 1))
    h.take(h.scheduler.on_gpu_message(GpuReady("cuda:0")))
    [batch] = [a for a in h.step() if isinstance(a, SendBatch)]
    h.bake(batch.batch_id)
    assert [e.photo for e in h.exports] == [0]
    h.take(h.scheduler.gpu_died("cuda:0"))
    h.step()
    assert all(h.status(p) is OutcomeStatus.FAILED for p in (1, 2, 3, 4))
    assert "no GPU worker is left" in next(a.detail for a in h.actions if isinstance(a, Finish))
    assert h.take(h.scheduler.prepared(1, 1)) == [ReleasePixels(1)], "a late photo only frees its pixels"
    h.export_all()
    assert h.status(0) is OutcomeStatus.DONE
    h.check_promises()

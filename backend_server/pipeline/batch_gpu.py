"""Batch reconstruction on one or more GPUs (the `facerecon reconstruct --device cuda:0,...` path).

    photos -> CPU pool: decode, detect, landmarks -> main -> GPU process per device: fit, bake
           <- CPU pool: OBJ, PNG (fpng), JSON, write    <- textures in shared-memory slots <-

The CPU stages run in a pool of processes (one per core left after the GPU processes), so neither
MediaPipe nor PNG encoding (fpng holds the GIL: threads would not help) keeps a GPU waiting. Each
GPU process fits and bakes up to `batch_size` faces at once (the model's fit batched on its GPU)
and writes each texture into a shared-memory slot, so the 12 MB textures go to the exporting
process without being pickled. Every decision (what to prepare, what to batch where, what a
failure means) is `batch_scheduler.BatchScheduler`'s; this module does the I/O.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from shared_protocol import ErrorCode, ProtocolError, ReconstructOptions
from ..models.face_model import FaceModel
from .bake import Bake, Baker
from .batch import (BatchReport, OutcomeCallback, OutcomeStatus, PhotoOutcome, ignore_sigint_in_children,
                    sigint_ignored, write_photo)
from .batch_scheduler import (Action, BakedFace, BatchBaked, BatchFailed, BatchJob, BatchScheduler, Export,
                              Finish, GpuDead, GpuMessage, GpuReady, Prepare, ReleasePixels, SendBatch)
from .export import export_photo
from .fit import fit_faces
from .lighting import Lighting
from .progress import StageClock
from .reconstruct import LocatedPhoto, face_model

GPU_BATCHES_IN_FLIGHT = 2       # per GPU: one baking, one queued behind it


# --- CPU pool ---------------------------------------------------------------------------------------
_reconstructor = None
_slots: dict[str, shared_memory.SharedMemory] = {}


def _cpu_init() -> None:
    global _reconstructor
    ignore_sigint_in_children()
    os.environ.setdefault("GLOG_minloglevel", "2")
    import cv2
    import torch
    cv2.setNumThreads(1)
    torch.set_num_threads(1)          # one core per worker: the pool already fills the machine
    from .reconstruct import Reconstructor
    _reconstructor = Reconstructor("cpu")


def _locate(path: Path, stem: str, options: ReconstructOptions) -> tuple[LocatedPhoto, str, tuple[int, ...]]:
    """CPU: decode, detect, landmarks. Returns the located photo, the name of the shared-memory
    segment holding its pixels and their shape (the main process unlinks it once no GPU will read
    it: the pixels never pass through the main process). Raises ProtocolError."""
    assert _reconstructor is not None, "_cpu_init runs first"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProtocolError(ErrorCode.BAD_IMAGE, f"cannot read {path}: {exc}") from None
    photo, located, skin = _reconstructor.locate(data, stem + path.suffix, options, StageClock())
    height, width = photo.rgb.shape[:2]
    segment = shared_memory.SharedMemory(create=True, size=height * width * 4)
    pixels: np.ndarray = np.ndarray((height, width, 4), np.uint8, buffer=segment.buf)   # RGB and the skin probability
    pixels[..., :3] = photo.rgb
    pixels[..., 3] = skin.probability
    del pixels
    name = segment.name
    segment.close()
    return located, name, (height, width, 4)


def open_slot(name: str) -> shared_memory.SharedMemory:
    """Attach to a segment that the main process owns and unlinks (spawned children share its
    resource tracker, so attaching here adds no second owner)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    return shared_memory.SharedMemory(name=name)


def _attach(name: str) -> shared_memory.SharedMemory:
    if name not in _slots:
        _slots[name] = open_slot(name)
    return _slots[name]


def _export(located: LocatedPhoto, baked: tuple[BakedFace, ...], options: ReconstructOptions,
            out_dir: Path) -> dict[str, float]:
    """CPU: every face's files from its texture slot and its fit, written to out_dir; returns the
    photo's stage timings."""
    size = options.texture_size
    bakes = [Bake(np.ndarray((size, size, 3), np.uint8, buffer=_attach(face.slot).buf), face.seen_fraction,
                  face.mirrored_fraction, face.lighting or Lighting.flat()) for face in baked]
    clock = StageClock(timings={**located.timings_ms, "fit": sum(face.fit_ms for face in baked),
                                "bake": sum(face.bake_ms for face in baked)})
    exports = export_photo(located.photo, located.faces, located.names, [face.fit for face in baked], bakes,
                           face_model(options), options, clock)
    write_photo(out_dir, [file for export in exports for file in export.files])
    del bakes                                        # drop the views into shared memory before returning
    return clock.timings


# --- GPU processes ----------------------------------------------------------------------------------
def _gpu_main(device: str, jobs: Any, results: Any, slot_names: list[str], options: ReconstructOptions) -> None:
    """Fit and bake batches on one GPU until a None job arrives. Puts GpuReady once warmed up (or
    GpuDead if it cannot start), then one BatchBaked or BatchFailed per BatchJob."""
    ignore_sigint_in_children()
    import torch
    from .bake_gpu import GpuBaker
    size = options.texture_size
    try:
        baker = GpuBaker(device)
        model = face_model(options)
        model.warm_up(device)
        baker.warm_up(model.topology, size)
        slots = {name: open_slot(name) for name in slot_names}
        views: dict[str, np.ndarray] = {name: np.ndarray((size, size, 3), np.uint8, buffer=slot.buf)
                                        for name, slot in slots.items()}
        for view in views.values():                    # page-locked: textures DMA straight into the slots
            torch.cuda.cudart().cudaHostRegister(view.ctypes.data, view.nbytes, 0)
    except Exception as exc:                                    # no GPU, plugin build failed, ...
        results.put(GpuDead(device, f"{type(exc).__name__}: {exc}"))
        return
    results.put(GpuReady(device))
    while (job := jobs.get()) is not None:
        results.put(_fit_and_bake(job, device, model, baker, views, size))
    for view in views.values():
        torch.cuda.cudart().cudaHostUnregister(view.ctypes.data)
    # The mappings go with the process; the main process unlinks the slots.


def _fit_and_bake(job: BatchJob, device: str, model: FaceModel, baker: Baker, views: dict[str, np.ndarray],
                  size: int) -> GpuMessage:
    import torch
    start = time.perf_counter()
    try:
        fitted = fit_faces(model, job.landmarks, job.cameras, device)
        fit_s = time.perf_counter() - start
        segments = {name: open_slot(name) for name, _ in job.pixels}
        pixels: list[np.ndarray] = [np.ndarray(shape, np.uint8, buffer=segments[name].buf)
                                    for name, shape in job.pixels]            # (H, W, 4): RGB, skin
        bakes = baker.bake([p[..., :3] for p in pixels], [f.texture_vertices for f in fitted], job.cameras,
                           model.topology, size, [views[slot] for slot in job.slots],
                           skins=[p[..., 3] for p in pixels], delit=not job.lit_texture)
        del pixels
        for segment in segments.values():
            segment.close()
    except Exception as exc:
        return BatchFailed(job.batch_id, f"{type(exc).__name__}: {exc}")
    return BatchBaked(job.batch_id, tuple(f.fit for f in fitted),
                      tuple((b.seen_fraction, b.mirrored_fraction) for b in bakes),
                      fit_s, time.perf_counter() - start - fit_s, torch.cuda.max_memory_allocated(device) / 2**20,
                      tuple(b.lighting for b in bakes))


# --- the runner -------------------------------------------------------------------------------------
@dataclass
class _Photo:
    """What the runner holds per photo: its path and stem, when it started, its located faces and
    its pixels' shared-memory segment once prepared."""

    path: Path
    stem: str
    started: float | None = None              # perf_counter seconds when its locate was submitted
    located: LocatedPhoto | None = None
    pixels: tuple[str, tuple[int, ...]] | None = None


class GpuBatchRunner:
    """Runs photos through the CPU pool and the GPU processes; `run` hands each photo's
    PhotoOutcome to `on_outcome` as it ends."""

    def __init__(self, devices: list[str], options: ReconstructOptions, batch_size: int = 16,
                 cpu_workers: int | None = None) -> None:
        from ..render.rasterize_cuda import build_plugin
        build_plugin()
        self.devices = devices
        self.options = options
        self.batch_size = batch_size
        # One core for this process, one per GPU process, the rest for the CPU stages.
        self.cpu_workers = cpu_workers or max(1, (os.cpu_count() or 2) - len(devices) - 1)
        for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(variable, "1")     # inherited by the spawned workers: no oversubscription

    def run(self, photos: Sequence[tuple[Path, str]], out_dir: Path, on_outcome: OutcomeCallback) -> BatchReport:
        size = self.options.texture_size
        slot_count = len(self.devices) * GPU_BATCHES_IN_FLIGHT * self.batch_size + self.batch_size
        slots = [shared_memory.SharedMemory(create=True, size=size * size * 3) for _ in range(slot_count)]
        context = multiprocessing.get_context("spawn")
        results: Any = context.Queue()
        inboxes = {d: context.Queue() for d in self.devices}
        gpus = {d: context.Process(target=_gpu_main, args=(d, inboxes[d], results, [s.name for s in slots],
                                                            self.options), daemon=True)
                for d in self.devices}
        with sigint_ignored():
            for process in gpus.values():
                process.start()
        pool = ProcessPoolExecutor(self.cpu_workers, mp_context=context, initializer=_cpu_init)
        scheduler = BatchScheduler(len(photos), self.devices, [s.name for s in slots], self.batch_size,
                                   self.cpu_workers, GPU_BATCHES_IN_FLIGHT)
        loop = _Loop(self, scheduler, [_Photo(path, stem) for path, stem in photos], out_dir, on_outcome, pool,
                     inboxes)
        start = time.perf_counter()
        interrupted = False
        try:
            loop.run(results, gpus)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            if interrupted:                          # Ctrl+C: the children ignore it; stop them now
                for child in multiprocessing.active_children():
                    child.terminate()
            for inbox in inboxes.values():
                inbox.put(None)
            for process in gpus.values():
                process.join(1 if interrupted else 30)
                if process.is_alive():
                    process.terminate()
            loop.release_all()
            pool.shutdown(wait=not interrupted, cancel_futures=True)
            for slot in slots:
                slot.close()
                slot.unlink()
        scheduler.report.seconds = time.perf_counter() - start
        return scheduler.report


class _Loop:
    """The runner's I/O: carries out the scheduler's actions and feeds it the news from the CPU
    pool and the GPU processes."""

    def __init__(self, runner: GpuBatchRunner, scheduler: BatchScheduler, photos: list[_Photo], out_dir: Path,
                 on_outcome: OutcomeCallback, pool: ProcessPoolExecutor, inboxes: dict[str, Any]) -> None:
        self.options = runner.options
        self.scheduler = scheduler
        self.photos = photos
        self.out_dir = out_dir
        self.on_outcome = on_outcome
        self.pool = pool
        self.inboxes = inboxes
        self.futures: dict[Future, tuple[str, int]] = {}        # -> ("locate" | "export", photo)
        self.timings: dict[int, dict[str, float]] = {}

    def run(self, results: Any, gpus: dict[str, Any]) -> None:
        scheduler = self.scheduler
        while not scheduler.finished:
            self.carry_out(scheduler.next_actions())
            try:
                while True:
                    message = results.get_nowait()
                    if isinstance(message, GpuDead):
                        raise RuntimeError(f"GPU worker {message.device} could not start: {message.message}")
                    self.carry_out(scheduler.on_gpu_message(message))
            except queue.Empty:
                pass
            for device in list(scheduler.alive):
                if not gpus[device].is_alive():
                    self.carry_out(scheduler.gpu_died(device))
            # CPU pool news (this wait is also the loop's pause).
            if self.futures:
                done, _ = wait(list(self.futures), timeout=0.002, return_when=FIRST_COMPLETED)
            else:
                done = set()
                time.sleep(0.002)
            for future in done:
                self.carry_out(self.on_future(future))

    def on_future(self, future: Future) -> list[Action]:
        kind, index = self.futures.pop(future)
        photo = self.photos[index]
        try:
            outcome = future.result()
        except ProtocolError as exc:
            detail = f"{exc.code.value}: {exc.message}"
            return (self.scheduler.prepare_failed if kind == "locate" else self.scheduler.export_failed)(index, detail)
        except Exception as exc:                               # e.g. disk full while writing
            detail = f"{'internal' if kind == 'locate' else 'cannot write results'}: {type(exc).__name__}: {exc}"
            return (self.scheduler.prepare_failed if kind == "locate" else self.scheduler.export_failed)(index, detail)
        if kind == "locate":
            photo.located, segment, shape = outcome
            photo.pixels = (segment, shape)
            return self.scheduler.prepared(index, len(photo.located.faces))
        self.timings[index] = outcome
        return self.scheduler.exported(index)

    def carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Prepare):
                photo = self.photos[action.photo]
                photo.started = time.perf_counter()
                self.futures[self.pool.submit(_locate, photo.path, photo.stem, self.options)] = ("locate", action.photo)
            elif isinstance(action, SendBatch):
                self.inboxes[action.device].put(self.batch_job(action))
            elif isinstance(action, Export):
                located = self.photos[action.photo].located
                assert located is not None                    # only prepared photos are exported
                future = self.pool.submit(_export, located, action.faces, self.options, self.out_dir)
                self.futures[future] = ("export", action.photo)
            elif isinstance(action, ReleasePixels):
                self.release(self.photos[action.photo])
            elif isinstance(action, Finish):
                self.finish(action)

    def batch_job(self, batch: SendBatch) -> BatchJob:
        pixels, cameras, landmarks = [], [], []
        for member in batch.members:
            photo = self.photos[member.photo]
            assert photo.located is not None and photo.pixels is not None    # only prepared photos are batched
            pixels.append(photo.pixels)
            cameras.append(photo.located.camera)
            landmarks.append(photo.located.faces[member.face].landmarks)
        return BatchJob(batch.batch_id, tuple(pixels), tuple(cameras), tuple(landmarks),
                        tuple(member.slot for member in batch.members), self.options.lit_texture)

    def finish(self, action: Finish) -> None:
        photo = self.photos[action.photo]
        seconds = time.perf_counter() - photo.started if photo.started is not None else 0.0
        outcome = PhotoOutcome(photo.path, action.status, action.detail, seconds, photo.stem,
                               self.timings.pop(action.photo, {}))
        if outcome.status is OutcomeStatus.DONE:
            self.scheduler.report.count_done(outcome)
        self.on_outcome(outcome)

    @staticmethod
    def release(photo: _Photo) -> None:
        if photo.pixels is not None:
            segment = shared_memory.SharedMemory(name=photo.pixels[0])
            segment.close()
            segment.unlink()
            photo.pixels = None

    def release_all(self) -> None:
        """At the end (or on an error): wait for the photos still being located and free every
        photo's pixels, so no segment outlives the run."""
        for future, (kind, index) in list(self.futures.items()):
            if kind == "locate" and not future.cancel():
                try:
                    _, segment, shape = future.result(timeout=60)
                    self.photos[index].pixels = (segment, shape)
                except Exception:                    # failed, or its worker was stopped (Ctrl+C)
                    pass
        for photo in self.photos:
            self.release(photo)

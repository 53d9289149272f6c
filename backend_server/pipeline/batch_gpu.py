"""Batch reconstruction on one or more GPUs (the `facerecon reconstruct --device cuda:0,...` path).

    photos -> CPU pool: decode, detect, landmarks, fit* -> main -> GPU process per device: fit*, bake
           <- CPU pool: OBJ, PNG (fpng), JSON, write    <- textures in shared-memory slots <-

*fit: the built-in model's (2 ms, per photo) in the CPU pool; a morphable model's on the GPU, a
whole batch of faces in one Levenberg-Marquardt solve, just before their bake.

The CPU stages run in a pool of processes (one per core left after the GPU processes), so neither
MediaPipe nor PNG encoding (fpng holds the GIL: threads would not help) keeps a GPU waiting. Each
GPU process bakes up to `batch_size` faces at once and writes each texture into a shared-memory
slot, so the 12 MB textures go to the exporting process without being pickled.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from shared_protocol import ErrorCode, ProtocolError, ReconstructOptions

GPU_BATCHES_IN_FLIGHT = 2       # per GPU: one baking, one queued behind it


@dataclass
class PhotoOutcome:
    """What became of one photo in a batch run (CPU or GPU path)."""

    photo: Path
    status: str                   # done, failed, skipped
    detail: str = ""
    seconds: float = 0.0
    stem: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class BatchReport:
    """What a batch run measured: throughput and, per GPU, bake time and peak memory."""

    photos: int = 0
    faces: int = 0
    seconds: float = 0.0
    gpu: dict[str, dict[str, float]] = field(default_factory=dict)   # device -> bake_s, fit_s, batches, peak_mb
    cpu_stage_ms: dict[str, float] = field(default_factory=dict)     # summed over photos

    @property
    def photos_per_s(self) -> float:
        return self.photos / self.seconds if self.seconds else 0.0


# --- CPU pool --------------------------------------------------------------------------------------
_reconstructor = None
_slots: dict[str, shared_memory.SharedMemory] = {}


def _cpu_init() -> None:
    global _reconstructor
    os.environ.setdefault("GLOG_minloglevel", "2")
    import cv2
    import torch
    cv2.setNumThreads(1)
    torch.set_num_threads(1)          # one core per worker: the pool already fills the machine
    from .reconstruct import Reconstructor
    _reconstructor = Reconstructor("cpu")


def _prepare(path: Path, stem: str, options: ReconstructOptions) -> Any:
    """CPU: decode, detect, landmarks, and the built-in model's fit. Returns (PreparedPhoto without
    its pixels, the name of the shared-memory segment holding them, their shape), or a ProtocolError. The main process
    unlinks the segment once the GPU has read it: the pixels never pass through the main process."""
    try:
        prepared = _reconstructor.prepare(path.read_bytes(), stem + path.suffix, options, defer_model_fit=True)
    except ProtocolError as exc:
        return exc
    except OSError as exc:
        return ProtocolError(ErrorCode.BAD_IMAGE, f"cannot read {path}: {exc}")
    rgb = prepared.photo.rgb
    segment = shared_memory.SharedMemory(create=True, size=rgb.nbytes)
    np.ndarray(rgb.shape, np.uint8, buffer=segment.buf)[...] = rgb
    name = segment.name
    segment.close()
    prepared.photo = replace(prepared.photo, rgb=None)
    return prepared, name, rgb.shape


def open_slot(name: str) -> shared_memory.SharedMemory:
    """Attach to a slot that the main process owns and unlinks (spawned children share its
    resource tracker, so attaching here adds no second owner)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    return shared_memory.SharedMemory(name=name)


def _attach(name: str) -> shared_memory.SharedMemory:
    if name not in _slots:
        _slots[name] = open_slot(name)
    return _slots[name]


def _export(prepared: Any, baked: list[tuple[str, float, float, Any]], options: ReconstructOptions,
            out_dir: Path) -> dict[str, float]:
    """CPU: OBJ/MTL/PNG/JSON of every face from its texture slot (and its model fit from the GPU),
    written to out_dir."""
    from .bake import Bake
    from .export import write_files
    from ..models import store
    from .reconstruct import attach_model_fit, export_faces
    size = options.texture_size
    for face, (slot, seen, mirrored, fit) in zip(prepared.faces, baked):
        if fit is not None:
            attach_model_fit(face, store.load_model(options.model), fit)
        texture = np.ndarray((size, size, 3), np.uint8, buffer=_attach(slot).buf)
        face.bake = Bake(texture, seen, mirrored)
    result = export_faces(prepared, options)
    write_files(out_dir, result.files)
    for face in prepared.faces:
        face.bake = None                      # drop the views into shared memory before returning
    return result.timings_ms


# --- GPU processes ---------------------------------------------------------------------------------
def _gpu_main(device: str, jobs: multiprocessing.Queue, results: multiprocessing.Queue,
              slot_names: list[str], size: int, options: ReconstructOptions) -> None:
    """Bake batches on one GPU until a None job arrives. Reports on `results`: ('ready', device) once
    warmed up, or ('dead', device, message) if it cannot start; per batch ('baked', batch_id,
    [(seen, mirrored)], seconds, peak_mb, model fits or None, fit seconds) or ('failed', batch_id,
    message). A job's vertices are None for a morphable model: the process fits its landmarks."""
    import torch
    from ..models import store
    from ..models.builtin import NAME as BUILTIN_NAME, load_builtin
    from .bake_gpu import GpuBaker
    from .fit_model import ModelFitter
    from .reconstruct import output_topology
    try:
        baker = GpuBaker(device)
        topology = output_topology(options)
        fitter = None if options.model == BUILTIN_NAME else ModelFitter(store.load_model(options.model), device)
        reference = load_builtin().reference_vertices
        baker.warm_up(topology, size)
        slots = {name: open_slot(name) for name in slot_names}
        views = {name: np.ndarray((size, size, 3), np.uint8, buffer=slot.buf) for name, slot in slots.items()}
        for view in views.values():                    # page-locked: textures DMA straight into the slots
            torch.cuda.cudart().cudaHostRegister(view.ctypes.data, view.nbytes, 0)
    except Exception as exc:                                    # no GPU, plugin build failed, ...
        results.put(("dead", device, f"{type(exc).__name__}: {exc}"))
        return
    results.put(("ready", device))
    while (job := jobs.get()) is not None:
        batch_id, photo_refs, vertices, cameras, landmarks, slot_ids = job
        start = time.perf_counter()
        fits, fit_seconds = None, 0.0
        try:
            if fitter is not None:
                fits = fitter.fit(landmarks, cameras, reference)
                vertices = fitter.camera_points(fits, topology.refine.cols)
                fit_seconds = time.perf_counter() - start
            segments = {name: open_slot(name) for name, _ in photo_refs}
            photos = [np.ndarray(shape, np.uint8, buffer=segments[name].buf) for name, shape in photo_refs]
            bakes = baker.bake(photos, vertices, cameras, topology, size, [views[slot] for slot in slot_ids])
            del photos
            for segment in segments.values():
                segment.close()
        except Exception as exc:
            results.put(("failed", batch_id, f"{type(exc).__name__}: {exc}"))
            continue
        peak_mb = torch.cuda.max_memory_allocated(baker.device) / 2**20
        results.put(("baked", batch_id, [(b.seen_fraction, b.mirrored_fraction) for b in bakes],
                     time.perf_counter() - start - fit_seconds, peak_mb, fits, fit_seconds))
    for view in views.values():
        torch.cuda.cudart().cudaHostUnregister(view.ctypes.data)
    # The mappings go with the process; the main process unlinks the slots.


@dataclass
class _Photo:
    path: Path
    stem: str
    started: float
    prepared: Any = None
    pixels: tuple[str, tuple[int, ...]] | None = None    # shared-memory segment name, shape
    faces_at_gpu: int = 0                                 # faces in batches a GPU has not answered
    baked: dict[int, tuple[str, float, float, Any]] = field(default_factory=dict)   # slot, seen, mirrored, fit
    finished: bool = False

    def release_pixels(self) -> None:
        """Unlink the photo's shared-memory segment once no GPU will read it again: no face of it
        is at a GPU, and the photo has ended or every face is baked."""
        all_baked = self.prepared is not None and len(self.baked) == len(self.prepared.faces)
        if self.pixels is not None and self.faces_at_gpu == 0 and (self.finished or all_baked):
            segment = shared_memory.SharedMemory(name=self.pixels[0])
            segment.close()
            segment.unlink()
            self.pixels = None


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
        self.report = BatchReport(gpu={d: {"bake_s": 0.0, "fit_s": 0.0, "batches": 0, "faces": 0, "peak_mb": 0.0}
                                       for d in devices})

    def run(self, photos: list[tuple[Path, str]], out_dir: Path,
            on_outcome: Callable[[PhotoOutcome], None]) -> BatchReport:
        size = self.options.texture_size
        slot_count = len(self.devices) * GPU_BATCHES_IN_FLIGHT * self.batch_size + self.batch_size
        slots = [shared_memory.SharedMemory(create=True, size=size * size * 3) for _ in range(slot_count)]
        context = multiprocessing.get_context("spawn")
        results: multiprocessing.Queue = context.Queue()
        inboxes = {d: context.Queue() for d in self.devices}
        gpus = {d: context.Process(target=_gpu_main, args=(d, inboxes[d], results, [s.name for s in slots],
                                                            size, self.options), daemon=True)
                for d in self.devices}
        for process in gpus.values():
            process.start()
        pool = ProcessPoolExecutor(self.cpu_workers, mp_context=context, initializer=_cpu_init)
        try:
            self._loop(photos, out_dir, on_outcome, pool, results, inboxes, gpus, [s.name for s in slots])
        finally:
            for device, inbox in inboxes.items():
                inbox.put(None)
            for process in gpus.values():
                process.join(30)
                if process.is_alive():
                    process.terminate()
            pool.shutdown(cancel_futures=True)
            for slot in slots:
                slot.close()
                slot.unlink()
        return self.report

    def _loop(self, photos: list[tuple[Path, str]], out_dir: Path, on_outcome: Callable[[PhotoOutcome], None],
              pool: ProcessPoolExecutor, results: multiprocessing.Queue, inboxes: dict[str, Any],
              gpus: dict[str, Any], slot_names: list[str]) -> None:
        todo = deque(photos)
        free_slots = deque(slot_names)
        waiting_faces: deque[tuple[_Photo, int]] = deque()     # prepared, not yet sent to a GPU
        in_flight: dict[int, tuple[str, list[tuple[_Photo, int, str]]]] = {}
        ready = {d: False for d in self.devices}
        alive = set(self.devices)
        futures: dict[Future, tuple[str, _Photo]] = {}
        batch_ids = iter(range(1 << 62))
        start = time.perf_counter()
        remaining = len(photos)

        def finish(item: _Photo, status: str, detail: str, timings: dict[str, float] | None = None) -> None:
            nonlocal remaining
            if item.finished:
                return
            item.finished = True
            item.release_pixels()
            remaining -= 1
            outcome = PhotoOutcome(item.path, status, detail, time.perf_counter() - item.started, item.stem,
                                   timings or {})
            if status == "done":
                self.report.photos += 1
                for stage, ms in outcome.timings_ms.items():
                    self.report.cpu_stage_ms[stage] = self.report.cpu_stage_ms.get(stage, 0.0) + ms
            on_outcome(outcome)

        while remaining:
            # Keep the CPU pool busy, but bound the photos held in memory ahead of the GPUs.
            preparing = sum(1 for kind, _ in futures.values() if kind == "prepare")
            while todo and preparing < 2 * self.cpu_workers and len(waiting_faces) < 4 * self.batch_size * len(alive):
                path, stem = todo.popleft()
                item = _Photo(path, stem, time.perf_counter())
                futures[pool.submit(_prepare, path, stem, self.options)] = ("prepare", item)
                preparing += 1
            # Hand full batches (or the tail) to GPUs with room.
            for device in sorted(alive, key=lambda d: sum(1 for v in in_flight.values() if v[0] == d)):
                busy = sum(1 for v in in_flight.values() if v[0] == device)
                tail = not todo and preparing == 0
                if (ready[device] and busy < GPU_BATCHES_IN_FLIGHT and waiting_faces
                        and (len(waiting_faces) >= self.batch_size or tail)
                        and len(free_slots) >= min(self.batch_size, len(waiting_faces))):
                    batch = [waiting_faces.popleft() for _ in range(min(self.batch_size, len(waiting_faces)))]
                    members = [(item, index, free_slots.popleft()) for item, index in batch]
                    for item, _, _ in members:
                        item.faces_at_gpu += 1
                    batch_id = next(batch_ids)
                    in_flight[batch_id] = (device, members)
                    inboxes[device].put((batch_id,
                                         [item.pixels for item, _, _ in members],
                                         [item.prepared.faces[index].vertices for item, index, _ in members],
                                         [item.prepared.camera for item, _, _ in members],
                                         [item.prepared.faces[index].landmarks for item, index, _ in members],
                                         [slot for _, _, slot in members]))
            # GPU news.
            try:
                while True:
                    message = results.get_nowait()
                    self._on_gpu_message(message, in_flight, ready, alive, free_slots, pool, futures, out_dir, finish)
            except queue.Empty:
                pass
            for device in list(alive):
                if not gpus[device].is_alive():
                    self._gpu_died(device, in_flight, alive, free_slots, finish)
            if not alive:
                for item, _ in list(waiting_faces):
                    finish(item, "failed", "worker_failed: no GPU worker is left")
                for path, stem in todo:
                    finish(_Photo(path, stem, time.perf_counter()), "failed", "worker_failed: no GPU worker is left")
                todo.clear()
                waiting_faces.clear()
                for future in list(futures):
                    kind, item = futures.pop(future)
                    if kind == "prepare":
                        finish(item, "failed", "worker_failed: no GPU worker is left")
                if not futures:
                    break
            # CPU pool news (this wait is also the loop's pause).
            if futures:
                done, _ = wait(list(futures), timeout=0.002, return_when=FIRST_COMPLETED)
            else:
                done = set()
                time.sleep(0.002)
            for future in done:
                kind, item = futures.pop(future)
                if kind == "prepare":
                    outcome = future.result()
                    if isinstance(outcome, ProtocolError):
                        finish(item, "failed", f"{outcome.code.value}: {outcome.message}")
                        continue
                    prepared, segment, shape = outcome
                    item.prepared, item.pixels = prepared, (segment, shape)
                    waiting_faces.extend((item, index) for index in range(len(prepared.faces)))
                    self.report.faces += len(prepared.faces)
                else:
                    for slot, _, _, _ in item.baked.values():
                        free_slots.append(slot)
                    try:
                        timings = future.result()
                    except Exception as exc:                         # e.g. disk full
                        finish(item, "failed", f"cannot write results: {exc}")
                        continue
                    finish(item, "done", f"{len(item.prepared.faces)} face(s)", timings)
        self.report.seconds = time.perf_counter() - start

    def _on_gpu_message(self, message: tuple, in_flight: dict, ready: dict, alive: set, free_slots: deque,
                        pool: ProcessPoolExecutor, futures: dict, out_dir: Path, finish: Callable) -> None:
        kind = message[0]
        if kind == "ready":
            ready[message[1]] = True
        elif kind == "dead":
            raise RuntimeError(f"GPU worker {message[1]} could not start: {message[2]}")
        elif kind == "failed":
            device = in_flight[message[1]][0]
            self._abandon(message[1], f"internal: bake on {device} failed: {message[2]}", in_flight,
                          free_slots, finish)
        else:
            _, batch_id, stats, seconds, peak_mb, fits, fit_seconds = message
            device, members = in_flight.pop(batch_id)
            gpu = self.report.gpu[device]
            gpu["bake_s"] += seconds
            gpu["fit_s"] += fit_seconds
            gpu["batches"] += 1
            gpu["faces"] += len(members)
            gpu["peak_mb"] = max(gpu["peak_mb"], peak_mb)
            for k, ((item, index, slot), (seen, mirrored)) in enumerate(zip(members, stats)):
                item.baked[index] = (slot, seen, mirrored, fits[k] if fits else None)
                item.faces_at_gpu -= 1
                item.release_pixels()
                if item.finished:
                    free_slots.append(slot)
                elif len(item.baked) == len(item.prepared.faces):
                    share_ms = seconds * 1000 / len(members)
                    item.prepared.clock.timings["bake"] = share_ms * len(item.prepared.faces)
                    if fits:
                        item.prepared.clock.timings["fit"] = fit_seconds * 1000 / len(members) * len(item.prepared.faces)
                    baked = [item.baked[k] for k in range(len(item.prepared.faces))]
                    futures[pool.submit(_export, item.prepared, baked, self.options, out_dir)] = ("export", item)

    def _gpu_died(self, device: str, in_flight: dict, alive: set, free_slots: deque, finish: Callable) -> None:
        alive.discard(device)
        for batch_id in [b for b, (d, _) in in_flight.items() if d == device]:
            self._abandon(batch_id, f"worker_failed: the GPU worker on {device} died", in_flight, free_slots,
                          finish)

    @staticmethod
    def _abandon(batch_id: int, detail: str, in_flight: dict, free_slots: deque, finish: Callable) -> None:
        """A batch the GPU will not deliver: free its slots and fail its photos."""
        _, members = in_flight.pop(batch_id)
        for item, _, slot in members:
            free_slots.append(slot)
            item.faces_at_gpu -= 1
        for item in {id(m[0]): m[0] for m in members}.values():
            finish(item, "failed", detail)
            item.release_pixels()                  # also when it had already failed for another reason


def run_batch(devices: list[str], photos: Iterable[tuple[Path, str]], out_dir: Path, options: ReconstructOptions,
              batch_size: int, on_outcome: Callable[[PhotoOutcome], None]) -> BatchReport:
    runner = GpuBatchRunner(devices, options, batch_size)
    return runner.run(list(photos), out_dir, on_outcome)

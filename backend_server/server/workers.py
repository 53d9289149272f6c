"""Worker processes: one per GPU (pinned to it) or N on the CPU, each loading the models once.

Worker link (a DEALER in each worker, the server's worker ROUTER on a private ipc:// socket):

    server -> worker   encode(ReconstructRequest) with request_id = job_id; encode(Cancel); [STOP]
    worker -> server   [READY, JSON {"pid", "device"}] once the models are loaded, then per job:
                       encode(Progress)*, then exactly one encode(Result) or encode(Error)

A worker checks for a Cancel of its job at every stage boundary. Each (re)start uses a new
identity (`w0.1`, `w0.2`, ...) so nothing a dead worker sent can be taken for its successor's.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import zmq

from shared_protocol import (Cancel, Error, ErrorCode, Progress, ProtocolError, ReconstructRequest, Result,
                             decode, encode)

READY = b"\x00ready"
STOP = b"\x00stop"
MAX_RESTART_DELAY_S = 30.0

log = logging.getLogger("facerecon.worker")


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker process needs to start: where to connect and what to warm up."""

    address: str            # the server's worker ROUTER
    texture_size: int       # pixels; the UV raster for this size is built before READY
    subdivision: int
    models: tuple[str, ...]  # every model's data and UV raster is loaded before READY
    log_level: int = logging.INFO


def worker_main(config: WorkerConfig, identity: bytes, device: str) -> None:
    """Entry point of a worker process (spawned). Returns when told to STOP or the server dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the server decides when workers stop
    os.environ.setdefault("GLOG_minloglevel", "2")
    logging.basicConfig(level=config.log_level, format=f"%(asctime)s {identity.decode()} %(levelname)s %(message)s")
    from ..pipeline.reconstruct import Reconstructor       # heavy: only worker processes load it

    context = zmq.Context()
    link = context.socket(zmq.DEALER)
    link.setsockopt(zmq.LINGER, 2000)
    link.identity = identity
    link.connect(config.address)
    reconstructor = Reconstructor(device)
    reconstructor.warm_up(config.texture_size, config.subdivision, config.models)
    link.send_multipart([READY, json.dumps({"pid": os.getpid(), "device": device}).encode()])
    parent = multiprocessing.parent_process()
    try:
        while True:
            if not link.poll(1000):
                if parent is not None and not parent.is_alive():
                    log.warning("server process is gone; worker exits")
                    return
                continue
            frames = link.recv_multipart()
            if frames[0] == STOP:
                return
            message = decode(frames)
            if isinstance(message, ReconstructRequest):
                link.send_multipart(encode(run_job(reconstructor, link, message)), copy=False)
            elif not isinstance(message, Cancel):   # a Cancel after its job ended needs nothing
                log.error("unexpected %s on the worker link", type(message).__name__)
    finally:
        reconstructor.close()
        link.close()
        context.term()


def run_job(reconstructor: Any, link: zmq.Socket, request: ReconstructRequest) -> Result | Error:
    """Run one job; Progress goes out as each stage starts; returns its Result or Error."""
    job_id = request.request_id

    def on_stage(stage: str, fraction: float, photo: int | None = None) -> None:
        link.send_multipart(encode(Progress(job_id, stage, fraction, photo)))
        while link.poll(0):
            incoming = decode(link.recv_multipart())
            if isinstance(incoming, Cancel) and incoming.job_id == job_id:
                raise ProtocolError(ErrorCode.CANCELLED, f"cancelled before stage '{stage}'")

    start = time.perf_counter()
    try:
        if request.is_person:
            person = reconstructor.run_person(request.photos, request.options, on_stage)
            return Result(job_id, tuple(person.files), {
                "faces": 1, "photos": len(request.photos), "used_photos": list(person.kept),
                "left_out": {request.photos[k].name: why for k, why in person.fit.left_out.items()},
                "gpu_memory_mb": gpu_memory_mb(reconstructor.device),
                "timings_ms": {k: round(v, 2) for k, v in person.timings_ms.items()},
                "worker_ms": round((time.perf_counter() - start) * 1000, 2)})
        outcome = reconstructor.run(request.photo, request.photo_name, request.options, on_stage)
    except ProtocolError as exc:
        return Error(exc.code, exc.message, job_id=job_id, photo_name=exc.photo_name)
    except Exception as exc:                                      # a bug: report it, keep serving
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        return Error(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", job_id=job_id)
    summary = {"faces": len(outcome.faces), "photo_size_px": list(outcome.photo.size),
               "gpu_memory_mb": gpu_memory_mb(reconstructor.device),
               "timings_ms": {k: round(v, 2) for k, v in outcome.timings_ms.items()},
               "worker_ms": round((time.perf_counter() - start) * 1000, 2)}    # the whole pipeline call
    return Result(job_id, tuple(outcome.files), summary)


def gpu_memory_mb(device: str) -> float | None:
    """Peak GPU memory this worker process has allocated (MiB); None on the CPU."""
    if device == "cpu":
        return None
    import torch
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


class WorkerState(str, Enum):
    """Where a worker slot is; Status messages carry the value."""

    STARTING = "starting"                       # process spawned, loading models
    IDLE = "idle"                               # READY, no job
    BUSY = "busy"                               # running a job
    WAITING_TO_RESTART = "waiting_to_restart"   # its process died; restarts at restart_at
    STOPPED = "stopped"                         # the server is shutting down


ALIVE_STATES = (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY)


@dataclass
class WorkerHandle:
    """The server's view of one worker slot; the process in it is replaced when it dies."""

    name: str                      # w0, w1, ...: the slot, stable across restarts
    device: str                    # cpu, cuda:0, ...
    generation: int = 0
    process: Any = None            # multiprocessing.Process
    state: WorkerState = WorkerState.STARTING
    job: Any = None                # the scheduler.Job it runs
    jobs_done: int = 0
    restarts: int = 0
    restart_at: float = 0.0        # monotonic seconds; when a waiting slot starts again
    failed_starts: int = 0         # deaths in a row before READY: the restart back-off grows with them
    stop_reason: str | None = None  # why the server killed this process, if it did
    gpu_memory_mb: float | None = None   # peak, as the worker last reported it
    started_at: float = field(default_factory=time.monotonic)

    @property
    def identity(self) -> bytes:
        return f"{self.name}.{self.generation}".encode()

    def start(self, config: WorkerConfig) -> None:
        self.generation += 1
        self.process = multiprocessing.get_context("spawn").Process(
            target=worker_main, args=(config, self.identity, self.device), name=f"facerecon-{self.name}",
            daemon=True)
        self.process.start()
        self.state = WorkerState.STARTING
        self.stop_reason = None
        self.started_at = time.monotonic()

    def died(self) -> bool:
        """True once when a running process has ended (then the slot waits to restart or stops)."""
        return (self.process is not None and self.state in ALIVE_STATES
                and not self.process.is_alive())

    def schedule_restart(self, now: float) -> None:
        """Call when the process died. One that died before READY (e.g. a broken model) restarts after
        0.5 s, 1 s, 2 s, ... (at most MAX_RESTART_DELAY_S) as such deaths repeat; one that got READY
        (models loaded: it lived normally) restarts at once, and the back-off starts over."""
        if self.state == WorkerState.STARTING:
            self.failed_starts += 1
            delay = min(MAX_RESTART_DELAY_S, 0.5 * 2 ** min(self.failed_starts - 1, 6))
        else:
            self.failed_starts, delay = 0, 0.0
        self.restarts += 1
        self.state = WorkerState.WAITING_TO_RESTART
        self.restart_at = now + delay

    def describe(self, viewer: bytes) -> dict[str, Any]:
        """This slot for a Status message to client `viewer`: the id of a job only if it is viewer's."""
        own_job = self.job is not None and self.job.client == viewer
        return {"name": self.name, "device": self.device, "state": self.state.value,
                "pid": self.process.pid if self.process is not None else None,
                "job_id": self.job.job_id if own_job else None,
                "jobs_done": self.jobs_done, "restarts": self.restarts, "gpu_memory_mb": self.gpu_memory_mb}

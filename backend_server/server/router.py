"""The backend server: a ROUTER socket facing clients, a fair bounded queue, worker processes.

One thread runs one poll loop over two sockets (ZeroMQ guide: ROUTER front, ROUTER back to
DEALER workers, "load-balancing broker"):

    clients  ROUTER  <- ReconstructRequest, Cancel, Ping, StatusRequest
                     -> Accepted; Progress "queued" when a worker takes the job, Progress per stage;
                        then exactly one Result or Error per accepted job;
                        Pong, Status, Error (bad message, busy, unknown job, shutting down)
    workers  ROUTER  <- READY, Progress, Result, Error       -> job requests, Cancel, STOP

Worker output is forwarded to the job's client without decoding its payloads: only the JSON
header frame is read to find the job. Status, pings and cancels are answered by this loop, so
they are answered while every worker is busy. The client socket is ROUTER_MANDATORY: a send to
a client that disconnected fails, and that client's queued jobs are dropped instead of run; a
send to a client that does not read waits in outbox.Outboxes, and its queued jobs wait too.
Accepted, Pong and Status carry `server_id` (one per start), so that a client whose job this
start never accepted learns that the job is lost. Refused handshakes are logged (handshakes.py).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from shared_protocol import (Accepted, Cancel, Error, ErrorCode, Message, Ping, Pong, Progress, ProtocolError,
                             ReconstructOptions, ReconstructRequest, Status, StatusRequest, decode, encode, limits)
from .. import __version__
from ..pipeline.memory import GIB, largest_texture_within, worker_peak_bytes
from .handshakes import RefusalLog
from .outbox import CLIENT_SNDHWM, Outboxes
from .rundir import make_run_dir
from .scheduler import FairQueue, Job
from .workers import READY, STOP, WorkerConfig, WorkerHandle, WorkerState

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("facerecon.server")
POLL_MS = 100
HOLDING_POLL_MS = 20            # while messages wait for a client that is not reading: retry soon
EXIT_FLUSH_S = 2.0              # at exit, how long messages still waiting for clients may take
LOOPBACK_PREFIXES = ("tcp://127.", "tcp://localhost:", "tcp://[::1]:", "ipc://", "inproc://")


def is_loopback(address: str) -> bool:
    return address.startswith(LOOPBACK_PREFIXES)


@dataclass
class ServerConfig:
    """Everything `facerecon-backend serve` configures."""

    bind: str = "tcp://127.0.0.1:5555"
    devices: list[str] = field(default_factory=lambda: ["cpu"])   # one entry per worker process
    models: tuple[str, ...] = ("builtin",)
    max_queued_jobs: int = 512
    max_queued_bytes: int = 2 * 1024 ** 3                           # encoded photo bytes in the queue
    client_share: float = 0.25                                      # of both bounds, for any one client
    worker_memory_bytes: int | None = None                          # a job estimated over it is refused
    job_timeout_s: float = 600.0                                    # a job running longer kills its worker
    drain_timeout_s: float = 60.0                                   # how long SIGTERM waits for running jobs
    keys_dir: Path | None = None                                    # CURVE keys; None = no authentication
    warm_texture_size: int = limits.DEFAULT_TEXTURE_SIZE
    warm_subdivision: int = 1


class JobOutcome(str, Enum):
    """How a job ended: counted in Counters, named in the job's log line."""

    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"      # by its client
    DROPPED = "dropped"          # its client went away: nobody to run it for


@dataclass
class Counters:
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    refused: int = 0
    bad_messages: int = 0


class Server:
    """Serve until `request_stop()` (SIGTERM/SIGINT), then drain and return."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.context = zmq.Context()
        self.queue = FairQueue(config.max_queued_jobs, config.max_queued_bytes, config.client_share)
        self.counters = Counters()
        self.started = time.monotonic()
        self.server_id = uuid.uuid4().hex       # this start: a client whose job it lacks knows it is lost
        self._stop_requested = False
        self._stopping_since: float | None = None
        self._authenticator: ThreadAuthenticator | None = None
        self.clients = self._bind_clients()             # first: a busy address leaves no folder behind
        self.outboxes = Outboxes(self.clients)
        self._link_dir = make_run_dir()                 # 0700: only this user; stale ones removed
        self.link = self.context.socket(zmq.ROUTER)
        self.link.setsockopt(zmq.LINGER, 0)
        link_address = f"ipc://{self._link_dir}/workers" if zmq.has("ipc") else "tcp://127.0.0.1:0"
        self.link.bind(link_address)
        self.worker_config = WorkerConfig(self.link.getsockopt_string(zmq.LAST_ENDPOINT),
                                          config.warm_texture_size, config.warm_subdivision, config.models,
                                          logging.getLogger().level or logging.INFO)
        self.workers = [WorkerHandle(f"w{n}", device) for n, device in enumerate(config.devices)]
        self._by_identity: dict[bytes, WorkerHandle] = {}

    # --- setup ---------------------------------------------------------------------------------
    def _bind_clients(self) -> zmq.Socket:
        socket = self.context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 2000)                   # flush last answers on shutdown
        socket.setsockopt(zmq.MAXMSGSIZE, limits.MAX_PHOTO_BYTES + limits.MAX_HEADER_BYTES)
        socket.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)          # per client; then outbox.Outboxes holds
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)            # a gone client or a full pipe raises
        socket.setsockopt(zmq.RCVHWM, 10_000)
        self.refusals = RefusalLog(socket)                    # logs refused handshakes
        if self.config.keys_dir is not None:
            from .auth import load_server_keys, start_authenticator
            self._authenticator, count = start_authenticator(self.context, self.config.keys_dir,
                                                             self.refusals.refused_key)
            public, secret = load_server_keys(self.config.keys_dir)
            socket.curve_server = True
            socket.curve_publickey, socket.curve_secretkey = public, secret
            log.info("CURVE authentication on: %d authorised client key(s)", count)
        socket.bind(self.config.bind)
        return socket

    @property
    def address(self) -> str:
        """The bound client address (with the real port when bound to port 0 or '*')."""
        return self.clients.getsockopt_string(zmq.LAST_ENDPOINT)

    def request_stop(self) -> None:
        """Safe from a signal handler: the loop notices within POLL_MS."""
        self._stop_requested = True

    # --- main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        for worker in self.workers:
            worker.start(self.worker_config)
            self._by_identity[worker.identity] = worker
        log.info("serving on %s with %d worker(s): %s (server id %s)", self.address, len(self.workers),
                 ", ".join(self.config.devices), self.server_id)
        poller = zmq.Poller()
        poller.register(self.clients, zmq.POLLIN)
        poller.register(self.link, zmq.POLLIN)
        poller.register(self.refusals.monitor, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(HOLDING_POLL_MS if self.outboxes else POLL_MS))
                if self.link in events:
                    self._drain_socket(self.link, self._on_worker_message)
                if self.clients in events:
                    self._drain_socket(self.clients, self._on_client_message)
                for client in self.outboxes.flush():
                    self._forget_client(client)
                self.refusals.drain()
                self._watch_workers()
                if self._stop_requested and self._stopping_since is None:
                    self._begin_shutdown()
                self._dispatch()
                if self._stopping_since is not None and self._drained(self._stopping_since):
                    break
        finally:
            self._shutdown_workers()
            self._flush_outboxes(EXIT_FLUSH_S)
            self.close()
        counters = self.counters
        log.info("stopped: %d done, %d failed, %d cancelled; %d requests refused, %d bad messages",
                 counters.done, counters.failed, counters.cancelled, counters.refused, counters.bad_messages)
        return 0

    def close(self) -> None:
        self.refusals.close()
        if self._authenticator is not None:
            self._authenticator.stop()
        self.clients.close()
        self.link.close()
        self.context.term()
        shutil.rmtree(self._link_dir, ignore_errors=True)

    def _flush_outboxes(self, at_most_s: float) -> None:
        """On the way out: send what still waits for clients that read, for at most at_most_s."""
        end = time.monotonic() + at_most_s
        while self.outboxes and time.monotonic() < end:
            for client in self.outboxes.flush():
                self.outboxes.forget(client)
            time.sleep(0.01)

    @staticmethod
    def _drain_socket(socket: zmq.Socket, handle: Any, at_most: int = 256) -> None:
        for _ in range(at_most):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

    # --- clients -------------------------------------------------------------------------------
    def _reply(self, client: bytes, message: Message, essential: bool = False) -> None:
        """essential: an Accepted or a job's final answer, which is never dropped (see Outboxes)."""
        self._send_to_client(client, encode(message), essential)

    def _send_to_client(self, client: bytes, frames: list, essential: bool) -> bool:
        """Send (or hold, for a client that is not reading), or learn that the client is gone
        (ROUTER_MANDATORY): then its jobs are dropped and False returned. `essential`: see Outboxes."""
        if self.outboxes.send(client, frames, essential):
            return True
        self._forget_client(client)
        return False

    def _forget_client(self, client: bytes) -> None:
        """The client disconnected: its queued jobs are dropped, its running jobs cancelled."""
        self.outboxes.forget(client)
        dropped = self.queue.remove_client(client)
        for job in dropped:
            self._finish(job, outcome=JobOutcome.DROPPED, why="client gone")
        for worker in self.workers:
            if worker.job is not None and worker.job.client == client:
                self.link.send_multipart([worker.identity, *encode(Cancel(worker.job.job_id))])
        if dropped:
            log.info("client %s disconnected: %d queued job(s) dropped", client.hex(), len(dropped))

    def _on_client_message(self, frames: list[zmq.Frame]) -> None:
        client = frames[0].bytes
        try:
            message = decode([f.buffer for f in frames[1:]])
        except ProtocolError as exc:
            self.counters.bad_messages += 1
            log.debug("bad message from %s: %s", client.hex(), exc)
            self._reply(client, Error(exc.code, exc.message))
            return
        if isinstance(message, ReconstructRequest):
            self._on_request(client, message)
        elif isinstance(message, Cancel):
            self._on_cancel(client, message.job_id)
        elif isinstance(message, Ping):
            self._reply(client, Pong(message.nonce, self.server_id))
        elif isinstance(message, StatusRequest):
            self._reply(client, self.status(client))
        elif not isinstance(message, (Error, Pong)):      # never answer an answer: no echo loops
            self.counters.bad_messages += 1
            self._reply(client, Error(ErrorCode.UNKNOWN_TYPE,
                                      f"the server does not take '{message.TYPE}' messages"))

    def _on_request(self, client: bytes, request: ReconstructRequest) -> None:
        refusal: tuple[ErrorCode, str] | None = None
        if self._stopping_since is not None:
            refusal = (ErrorCode.SHUTTING_DOWN, "the server is shutting down and takes no new jobs")
        elif request.options.model not in self.config.models:
            refusal = (ErrorCode.UNKNOWN_MODEL, f"model {request.options.model!r} is not installed on "
                       f"this server; installed: {', '.join(self.config.models)}")
        elif (why := self._over_memory(request.options, len(request.photos))) is not None:
            refusal = (ErrorCode.OVER_MEMORY_BUDGET, why)
        elif (why := self.queue.refusal(client, request.photo_bytes)) is not None:
            refusal = (ErrorCode.BUSY, f"{why} (queue depth {len(self.queue)})")
        if refusal is not None:
            self.counters.refused += 1
            self._reply(client, Error(*refusal, request_id=request.request_id))
            return
        job = Job(client, request)
        position = self.queue.push(job)
        self._reply(client, Accepted(request.request_id, job.job_id, position, self.server_id), essential=True)
        log.debug("job %s accepted: %s from %s, queue %d", job.job_id, request.photo_name, client.hex(),
                  len(self.queue))

    def _over_memory(self, options: ReconstructOptions, photos: int = 1) -> str | None:
        """Why a job with these options (and photos) would not fit a worker's memory budget, or None."""
        budget = self.config.worker_memory_bytes
        if budget is None:
            return None
        need = worker_peak_bytes(options, photos)
        if need <= budget:
            return None
        largest = largest_texture_within(budget)
        return (f"a {options.texture_size}² texture needs about {need / GIB:.1f} GB in a worker; this server gives "
                f"a worker {budget / GIB:.1f} GB (--worker-memory-gb)"
                + (f": ask for {largest}² or less" if largest else ""))

    def _on_cancel(self, client: bytes, job_id: str) -> None:
        queued = self.queue.remove(job_id, client)
        if queued is not None:
            self._finish(queued, Error(ErrorCode.CANCELLED, "cancelled while queued", job_id=job_id))
            return
        worker = next((w for w in self.workers if w.job is not None and w.job.job_id == job_id
                       and w.job.client == client), None)
        if worker is None:
            self._reply(client, Error(ErrorCode.UNKNOWN_JOB, f"no queued or running job {job_id[:128]} "
                                      "of this client (finished already?)", job_id=job_id[:128]))
            return
        self.link.send_multipart([worker.identity, *encode(Cancel(job_id))])

    def status(self, viewer: bytes) -> Status:
        """The server's Status as client `viewer` may see it: other clients' jobs without their ids."""
        return Status(__version__, tuple(dict.fromkeys(self.config.devices)), self.config.models,
                      tuple(w.describe(viewer) for w in self.workers), len(self.queue), self.counters.done,
                      self.counters.failed, time.monotonic() - self.started, server_id=self.server_id)

    # --- jobs ----------------------------------------------------------------------------------
    def _finish(self, job: Job, answer: Error | None = None, outcome: JobOutcome | None = None,
                why: str = "") -> None:
        """Account for a job's end and log it; sends `answer` (an Error) to its client when given.
        Without an outcome, the answer's code decides: CANCELLED for a cancel, FAILED otherwise."""
        if answer is not None:
            self._reply(job.client, answer, essential=True)
            why = why or answer.code.value
            if outcome is None:
                outcome = JobOutcome.CANCELLED if answer.code == ErrorCode.CANCELLED else JobOutcome.FAILED
        outcome = outcome or JobOutcome.FAILED
        if outcome == JobOutcome.DONE:
            self.counters.done += 1
        elif outcome in (JobOutcome.CANCELLED, JobOutcome.DROPPED):
            self.counters.cancelled += 1
        else:
            self.counters.failed += 1
        now = time.monotonic()
        run_ms = (now - job.started_at) * 1000 if job.started_at else 0.0
        wait_ms = ((job.started_at or now) - job.accepted_at) * 1000
        log.info("job %s %s%s: %s (%d bytes) client %s worker %s, waited %.0f ms, ran %.0f ms",
                 job.job_id, outcome.value, f" ({why})" if why else "", job.request.photo_name, job.photo_bytes,
                 job.client.hex(), job.worker or "-", wait_ms, run_ms)

    def _dispatch(self) -> None:
        """Hand queued jobs to idle workers; a job whose client is gone is dropped, not run, and the
        jobs of a client that is not reading (its answers wait in the outbox) wait too."""
        for worker in self.workers:
            while (worker.state == WorkerState.IDLE
                   and (job := self.queue.pop(skip=self.outboxes.holding_back())) is not None):
                if not self._send_to_client(job.client, encode(Progress(job.job_id, "queued", 0.0)), False):
                    self._finish(job, outcome=JobOutcome.DROPPED, why="client gone")
                    continue
                job.started_at, job.worker = time.monotonic(), worker.name
                worker.job, worker.state = job, WorkerState.BUSY
                request = ReconstructRequest(job.job_id, job.request.photo_name, job.request.photo,
                                             job.request.options, job.request.more_photos)
                self.link.send_multipart([worker.identity, *encode(request)], copy=False)

    # --- workers -------------------------------------------------------------------------------
    def _on_worker_message(self, frames: list[zmq.Frame]) -> None:
        worker = self._by_identity.get(frames[0].bytes)
        if worker is None:
            return                                   # a dead predecessor's last words
        if frames[1].bytes == READY:
            info = json.loads(frames[2].bytes)
            if worker.state == WorkerState.STARTING:
                worker.state = WorkerState.IDLE
            log.info("worker %s ready on %s (pid %s)", worker.name, worker.device, info.get("pid"))
            return
        header = json.loads(frames[1].bytes)
        job = worker.job
        if job is None or header.get("job_id") != job.job_id:
            log.warning("worker %s sent %s for job %s it does not run", worker.name, header.get("type"),
                        header.get("job_id"))
            return
        final = header["type"] in ("result", "error")
        self._send_to_client(job.client, frames[1:], final)
        if final:
            worker.gpu_memory_mb = header.get("summary", {}).get("gpu_memory_mb", worker.gpu_memory_mb)
            worker.job, worker.state = None, WorkerState.IDLE
            worker.jobs_done += 1
            if header["type"] == "result":
                self._finish(job, outcome=JobOutcome.DONE)
            else:
                code = str(header.get("code"))
                self._finish(job, outcome=JobOutcome.CANCELLED if code == ErrorCode.CANCELLED.value
                             else JobOutcome.FAILED, why=code)

    def _watch_workers(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            job = worker.job
            if job is not None and job.started_at and now - job.started_at > self.config.job_timeout_s:
                log.error("job %s ran over %g s on worker %s: killing the worker", job.job_id,
                          self.config.job_timeout_s, worker.name)
                worker.stop_reason = (f"the job ran over the server's job timeout ({self.config.job_timeout_s:g} s, "
                                      "--job-timeout)")
                worker.process.kill()
                worker.process.join(5)
            if worker.died():
                self._on_worker_death(worker, now)
            if worker.state == WorkerState.WAITING_TO_RESTART and now >= worker.restart_at:
                del self._by_identity[worker.identity]
                worker.start(self.worker_config)
                self._by_identity[worker.identity] = worker

    def _on_worker_death(self, worker: WorkerHandle, now: float) -> None:
        code = worker.process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        log.error("worker %s (%s, pid %s) %s%s", worker.name, worker.device, worker.process.pid, how,
                  f": {worker.stop_reason}" if worker.stop_reason else "")
        job = worker.job
        if job is not None:
            worker.job = None
            why = (f"{worker.stop_reason}: its worker was stopped and is being restarted; a smaller texture "
                   "size may help, or a longer --job-timeout on the server" if worker.stop_reason else
                   f"the worker process running this job {how} (out of memory or a crash in native code?); "
                   "it is being restarted; retry the photo")
            self._finish(job, Error(ErrorCode.WORKER_FAILED, why, job_id=job.job_id))
        if self._stopping_since is not None:
            worker.state = WorkerState.STOPPED
        else:
            worker.schedule_restart(now)

    # --- shutdown ------------------------------------------------------------------------------
    def _begin_shutdown(self) -> None:
        self._stopping_since = time.monotonic()
        queued = self.queue.drain()
        running = sum(1 for w in self.workers if w.job is not None)
        log.info("shutting down: %d queued job(s) refused, waiting up to %.0f s for %d running",
                 len(queued), self.config.drain_timeout_s, running)
        for job in queued:
            self._finish(job, Error(ErrorCode.SHUTTING_DOWN, "the server shut down before the job started",
                                    job_id=job.job_id))

    def _drained(self, stopping_since: float) -> bool:
        """True once no job runs, or the drain timeout is over (running jobs then fail)."""
        if all(w.job is None for w in self.workers):
            return True
        if time.monotonic() - stopping_since < self.config.drain_timeout_s:
            return False
        for worker in self.workers:
            if worker.job is not None:
                job, worker.job = worker.job, None
                self._finish(job, Error(ErrorCode.SHUTTING_DOWN, "the server shut down before the job "
                                        f"finished (drain timeout {self.config.drain_timeout_s:.0f} s)",
                                        job_id=job.job_id))
        return True

    def _shutdown_workers(self) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.is_alive() and worker.state == WorkerState.IDLE:
                self.link.send_multipart([worker.identity, STOP])
        for worker in self.workers:
            if worker.process is None:
                continue
            worker.process.join(5 if worker.state == WorkerState.IDLE else 0)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(5)
            worker.state = WorkerState.STOPPED


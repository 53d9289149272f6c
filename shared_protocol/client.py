"""A DEALER client shared by the CLI, the tests and the Blender add-on.

Needs pyzmq (the add-on ships its wheels); the rest of shared_protocol is standard library only.
Non-blocking use (the add-on's timer): `submit()` then `poll()` until it returns None, with a
`send_ping()` now and then while nothing arrives. Blocking use (CLI, tests): `reconstruct()` or
`status()`.

A lost job is reported, not waited for: each request is followed until its final answer, and a
Pong to a ping sent after the request shows whether the answering server has the job. It has not
when the request was never accepted (the Accepted would have come first on this connection), or
when the Pong's server_id differs from the Accepted's (the backend restarted). `poll()` then
returns an Error JOB_LOST for that request, as if the server had sent it.
"""
from __future__ import annotations

import itertools
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import zmq

from . import limits
from .errors import ErrorCode, ProtocolError
from .messages import (Accepted, Cancel, Error, Message, PersonPhoto, Ping, Pong, Progress, ReconstructOptions,
                       ReconstructRequest, Result, Status, StatusRequest, decode, encode)

HEARTBEAT_S = 1.0          # blocking waits ping this often while nothing arrives
MAX_PINGS_FOLLOWED = 1024  # pings awaiting their pong (a peer that never answers cannot grow this)


def load_curve_keys(client_secret_file: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a `.key_secret` file made by `facerecon-backend keys generate`."""
    import zmq.auth
    public, secret = zmq.auth.load_certificate(os.fspath(client_secret_file))
    if not secret:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{client_secret_file} holds no secret key")
    return public, secret


def read_server_public_key(path_or_key: str) -> bytes:
    """A server public key given as a Z85 string (40 chars) or as a `.key` file path."""
    if len(path_or_key) == 40 and not Path(path_or_key).exists():
        return path_or_key.encode("ascii")
    import zmq.auth
    public, _ = zmq.auth.load_certificate(path_or_key)
    return public


@dataclass
class _Pending:
    """A request this client sent that has no final answer yet."""

    sent: int                        # the client's send count once the request was out
    job_id: str | None = None
    server_id: str | None = None     # the server instance that accepted it (protocol 1.1)


class Client:
    """One DEALER connection to a backend. Not thread-safe: use it from one thread."""

    def __init__(self, address: str, *, server_public_key: bytes | None = None,
                 client_keys: tuple[bytes, bytes] | None = None,
                 context: zmq.Context | None = None) -> None:
        self.address = address
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, limits.MAX_MESSAGE_BYTES)
        if server_public_key is not None:
            if client_keys is None:
                client_keys = zmq.curve_keypair()
            self._socket.curve_serverkey = server_public_key
            self._socket.curve_publickey, self._socket.curve_secretkey = client_keys
        self._socket.connect(address)
        self._nonces = itertools.count(1)
        self._sent = 0                                   # messages sent, for ordering pings and requests
        self._pings: dict[int, int] = {}                 # nonce -> send count, until its pong
        self._pending: dict[str, _Pending] = {}          # request_id -> what is known of it
        self._lost: deque[Error] = deque()               # JOB_LOST errors poll() has yet to return
        self.server_id: str | None = None                # the server instance last heard from

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- non-blocking primitives -------------------------------------------------------------
    def send(self, message: Message) -> None:
        """Queue a message without ever blocking. A DEALER with no usable connection (e.g. the
        server refused our CURVE key) cannot queue: that raises ProtocolError UNREACHABLE."""
        try:
            self._socket.send_multipart(encode(message), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise ProtocolError(ErrorCode.UNREACHABLE,
                                f"cannot send to {self.address}: no connection (is the backend running, "
                                "and does it accept this client's key?)") from None
        self._sent += 1
        if isinstance(message, Ping):
            self._pings[message.nonce] = self._sent
            if len(self._pings) > MAX_PINGS_FOLLOWED:
                del self._pings[next(iter(self._pings))]

    def send_ping(self) -> int:
        """Send a Ping (heartbeat) with the next nonce; returns the nonce."""
        nonce = next(self._nonces)
        self.send(Ping(nonce))
        return nonce

    def poll(self, timeout_ms: int = 0) -> Message | None:
        """The next message, or None if none arrives within timeout_ms. Bad frames -> Error message;
        a request the backend no longer has -> Error JOB_LOST (see the module's docstring)."""
        if self._lost:
            return self._lost.popleft()
        if not self._socket.poll(timeout_ms, zmq.POLLIN):
            return None
        frames = self._socket.recv_multipart()
        try:
            message = decode(frames)
        except ProtocolError as exc:
            return Error(exc.code, f"bad message from the backend: {exc.message}")
        self._follow(message)
        return message

    def _follow(self, message: Message) -> None:
        """Keep track of pending requests from what the server says about them."""
        if isinstance(message, (Accepted, Pong, Status)) and message.server_id:
            self.server_id = message.server_id
        if isinstance(message, Accepted) and message.request_id in self._pending:
            pending = self._pending[message.request_id]
            pending.job_id, pending.server_id = message.job_id, message.server_id
        elif isinstance(message, Error) and message.request_id is None and message.job_id is None:
            for request_id in [r for r, p in self._pending.items() if p.job_id is None]:
                del self._pending[request_id]          # an unaddressed error answers unreadable requests
        elif isinstance(message, Error) and message.request_id is not None:
            self._pending.pop(message.request_id, None)
        elif isinstance(message, (Result, Error)):
            for request_id in [r for r, p in self._pending.items() if p.job_id == message.job_id]:
                del self._pending[request_id]
        elif isinstance(message, Pong) and (sent := self._pings.pop(message.nonce, None)) is not None:
            self._find_lost(sent, message.server_id)

    def _find_lost(self, ping_sent: int, server_id: str | None) -> None:
        """A pong to a ping sent after a request: the answering server must know that request."""
        for request_id, pending in list(self._pending.items()):
            if ping_sent <= pending.sent:
                continue                               # the ping went out before the request
            if pending.job_id is None:
                why = (f"the backend at {self.address} never received this request (it restarted, or "
                       "dropped the connection)")
            elif server_id and pending.server_id and server_id != pending.server_id:
                why = f"the backend at {self.address} restarted; job {pending.job_id} was lost with it"
            else:
                continue
            del self._pending[request_id]
            self._lost.append(Error(ErrorCode.JOB_LOST, f"{why}: submit the photo again",
                                    job_id=pending.job_id, request_id=request_id))

    @staticmethod
    def check_photo_size(photo_name: str, size: int) -> None:
        """Raise PAYLOAD_TOO_LARGE for a photo the backend would refuse (or, over ZMQ_MAXMSGSIZE,
        never even read): checked before sending, so the answer is at once and clear."""
        if size > limits.MAX_PHOTO_BYTES:
            raise ProtocolError(ErrorCode.PAYLOAD_TOO_LARGE,
                                f"{photo_name} is {size:,} bytes, over the backend's limit of "
                                f"{limits.MAX_PHOTO_BYTES:,} bytes ({limits.MAX_PHOTO_BYTES // limits.MIB} MiB) "
                                "per photo; resize it or save it as JPEG")

    def submit(self, photo: bytes, photo_name: str, options: ReconstructOptions | None = None,
               more_photos: Sequence[PersonPhoto] = ()) -> str:
        """Send a reconstruct request; returns its request_id (answers carry it, then the job_id).
        more_photos: further photos of the same person (protocol 1.2: one head from all of them).
        A photo over limits.MAX_PHOTO_BYTES raises ProtocolError PAYLOAD_TOO_LARGE, unsent; more
        than limits.MAX_PERSON_PHOTOS photos, BAD_FIELD."""
        self.check_photo_size(photo_name, len(photo))
        for extra in more_photos:
            self.check_photo_size(extra.name, len(extra.data))
        if 1 + len(more_photos) > limits.MAX_PERSON_PHOTOS:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{1 + len(more_photos)} photos of one person, over the "
                                f"limit of {limits.MAX_PERSON_PHOTOS}")
        total = len(photo) + sum(len(extra.data) for extra in more_photos)
        if total > limits.MAX_PERSON_BYTES:
            raise ProtocolError(ErrorCode.PAYLOAD_TOO_LARGE, f"the photos are {total:,} bytes together, over "
                                f"the backend's limit of {limits.MAX_PERSON_BYTES:,}")
        request_id = uuid.uuid4().hex
        self.send(ReconstructRequest(request_id, photo_name, photo, options or ReconstructOptions(),
                                     tuple(more_photos)))
        self._pending[request_id] = _Pending(self._sent)
        return request_id

    def cancel(self, job_id: str) -> None:
        self.send(Cancel(job_id))

    # --- blocking helpers --------------------------------------------------------------------
    def _wait(self, timeout_s: float, accept: Callable[[Message], bool], heartbeat: bool = False) -> Message:
        """The first message `accept` takes; with heartbeat, pings after each HEARTBEAT_S of silence."""
        end = time.monotonic() + timeout_s
        last_heard = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= end:
                raise ProtocolError(ErrorCode.TIMEOUT,
                                    f"no answer from {self.address} within {timeout_s:.0f} s; "
                                    "is the backend running (facerecon-backend serve)?")
            if heartbeat and now - last_heard >= HEARTBEAT_S:
                try:
                    self.send_ping()
                except ProtocolError:
                    pass                               # no connection now: the timeout decides
                last_heard = now
            until = min(end, last_heard + HEARTBEAT_S) if heartbeat else end
            message = self.poll(max(1, int((until - now) * 1000)))
            if message is None:
                continue
            last_heard = time.monotonic()
            if accept(message):
                return message

    def ping(self, timeout_s: float = 5.0) -> float:
        """Round-trip seconds of a Ping/Pong heartbeat."""
        start = time.monotonic()
        nonce = self.send_ping()
        self._wait(timeout_s, lambda m: isinstance(m, Pong) and m.nonce == nonce)
        return time.monotonic() - start

    def status(self, timeout_s: float = 5.0) -> Status:
        self.send(StatusRequest())
        message = self._wait(timeout_s, lambda m: isinstance(m, (Status, Error)))
        if isinstance(message, Error):
            raise ProtocolError(message.code, message.message)
        assert isinstance(message, Status)             # what `accept` let through
        return message

    def wait_until_ready(self, timeout_s: float, keep_waiting: Callable[[], bool] = lambda: True) -> Status:
        """Ask for status until every worker is idle (started, models loaded); returns that Status.

        Raises ProtocolError TIMEOUT after timeout_s, or as soon as keep_waiting() is False (e.g.
        the server's process has exited)."""
        end = time.monotonic() + timeout_s
        while keep_waiting() and time.monotonic() < end:
            try:
                status = self.status(timeout_s=1.0)
                if status.workers and all(w.get("state") == "idle" for w in status.workers):
                    return status
            except ProtocolError:
                pass                                   # not listening yet
            time.sleep(0.2)
        raise ProtocolError(ErrorCode.TIMEOUT, f"the backend at {self.address} was not ready "
                            f"within {timeout_s:.0f} s")

    def reconstruct(self, photo: bytes, photo_name: str, options: ReconstructOptions | None = None,
                    timeout_s: float = 300.0,
                    on_progress: Callable[[Progress], None] | None = None,
                    more_photos: Sequence[PersonPhoto] = ()) -> Result:
        """Blocking round trip. Raises ProtocolError with the backend's code on failure (its
        photo_name set when one photo of several failed), JOB_LOST within seconds when the backend
        restarts (or never got the request), TIMEOUT after timeout_s."""
        request_id = self.submit(photo, photo_name, options, more_photos)
        job_id: str | None = None

        def mine(message: Message) -> bool:
            nonlocal job_id
            if isinstance(message, Accepted) and message.request_id == request_id:
                job_id = message.job_id
                return False
            if isinstance(message, Progress) and message.job_id == job_id:
                if on_progress:
                    on_progress(message)
                return False
            if isinstance(message, Result):
                return message.job_id == job_id
            if isinstance(message, Error):
                return (message.request_id == request_id or (job_id is not None and message.job_id == job_id)
                        or (message.request_id is None and message.job_id is None))
            return False

        try:
            message = self._wait(timeout_s, mine, heartbeat=True)
        finally:
            self._pending.pop(request_id, None)
        if isinstance(message, Error):
            raise ProtocolError(message.code, message.message, message.photo_name)
        assert isinstance(message, Result)             # what `mine` let through
        return message

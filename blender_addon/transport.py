"""Talking to the backend without ever blocking: one job or one status check, advanced by `poll()`.

No bpy here: Blender's timer calls `poll()` every ~0.1 s; each call reads whatever has arrived
(non-blocking receives) and returns at once. Liveness follows the ZeroMQ guide's heartbeat:
while waiting, a Ping goes out every second, and any message (Pong included) proves the backend
alive; silence for `connect_timeout_s` means it is down, unreachable, or refused our CURVE key.
A Pong from a server that does not have our job (it restarted) fails the job with `job_lost`
(the Client turns it into an Error for our request).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .protocol import (Accepted, Cancel, Client, Error, ErrorCode, Message, PersonPhoto, Progress, ProtocolError,
                       ReconstructOptions, Result, Status, StatusRequest, limits, load_curve_keys,
                       read_server_public_key)

HEARTBEAT_S = 1.0


@dataclass(frozen=True)
class Connection:
    """Where the backend is and which CURVE key files to use (empty strings: no authentication)."""

    address: str
    server_key_file: str = ""
    client_key_file: str = ""
    connect_timeout_s: float = 5.0       # silence before the backend counts as unreachable
    job_timeout_s: float = 300.0         # a whole job, queueing included

    def open(self) -> Client:
        """A connected client; ProtocolError(BAD_FIELD) names a key file that cannot be used."""
        if bool(self.server_key_file) != bool(self.client_key_file):
            raise ProtocolError(ErrorCode.BAD_FIELD, "set both key files (server key and client key) "
                                "in the add-on preferences, or neither")
        if not self.server_key_file:
            return Client(self.address)
        for path in (self.server_key_file, self.client_key_file):
            if not Path(path).is_file():
                raise ProtocolError(ErrorCode.BAD_FIELD, f"key file {path} does not exist")
        try:
            server_key = read_server_public_key(self.server_key_file)
            client_keys = load_curve_keys(self.client_key_file)
        except (OSError, ValueError) as exc:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"cannot read the key files: {exc}") from None
        return Client(self.address, server_public_key=server_key, client_keys=client_keys)

    def silence_message(self, seconds: float) -> str:
        keys = (" and that the server accepts your client key (keys/authorized_clients)"
                if self.server_key_file else "")
        return (f"no answer from the backend at {self.address} for {seconds:.0f} s: check that "
                f"`facerecon-backend serve` runs there{keys}")


class _Exchange:
    """Shared heartbeat and timeout bookkeeping of one conversation with the backend."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.client: Client | None = None
        self.state = "starting"          # subclasses: ... -> done | failed | cancelled
        self.error: str = ""
        self.error_code: str = ""
        self.started = self.last_heard = self._last_ping = time.monotonic()

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def _fail(self, code: str, message: str) -> None:
        self.state, self.error_code, self.error = "failed", code, message
        self.close()

    def _receive(self) -> list:
        """Everything that arrived, without waiting; heartbeats and timeouts handled here."""
        now = time.monotonic()
        messages: list = []
        if self.client is None:
            return messages
        while (message := self.client.poll(0)) is not None:
            messages.append(message)
        if messages:
            self.last_heard = now
        elif now - self.last_heard > self.connection.connect_timeout_s:
            self._fail(ErrorCode.UNREACHABLE.value, self.connection.silence_message(now - self.last_heard))
        elif now - self._last_ping > HEARTBEAT_S:
            self._ping()                 # the Pong also tells the client whether the server has our job
            self._last_ping = now
        return messages

    def _send(self, message: Message) -> None:
        """Send without blocking; a connection that cannot take it fails the exchange."""
        if self.client is None:
            return
        try:
            self.client.send(message)
        except ProtocolError as exc:
            self._fail(exc.code.value, exc.message)

    def _ping(self) -> None:
        if self.client is None:
            return
        try:
            self.client.send_ping()
        except ProtocolError as exc:
            self._fail(exc.code.value, exc.message)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class ReconstructJob(_Exchange):
    """One photo (or, with more_photo_paths, several photos of one person: one head) to the backend
    and its result back. States: starting -> queued -> running -> done | failed | cancelled. `stage`
    and `fraction` (0..1) follow the backend's progress; `photo` the photo a stage works on (1-based
    in `stage`'s text when there are several)."""

    def __init__(self, connection: Connection, photo_path: str, options: ReconstructOptions,
                 more_photo_paths: tuple[str, ...] = ()) -> None:
        super().__init__(connection)
        self.photo_path = photo_path
        self.more_photo_paths = more_photo_paths
        self.options = options
        self.job_id: str | None = None
        self.request_id: str | None = None
        self.stage = "connecting"
        self.fraction = 0.0
        self.queue_position = 0
        self.result: Result | None = None
        self._cancel_requested = False

    def start(self) -> None:
        """Read the photo and send it; a bad path or key file fails the job at once (state 'failed')."""
        path = Path(self.photo_path)
        for item in (self.photo_path, *self.more_photo_paths):
            if not item or not Path(item).is_file():
                return self._fail(ErrorCode.BAD_IMAGE.value, f"photo {item or '(none)'} does not exist; "
                                  "pick a photo file")
        try:
            for item in (self.photo_path, *self.more_photo_paths):
                Client.check_photo_size(Path(item).name, Path(item).stat().st_size)   # before reading them
            more = tuple(PersonPhoto(Path(p).name[:limits.MAX_NAME_CHARS], Path(p).read_bytes())
                         for p in self.more_photo_paths)
            self.client = self.connection.open()
            self.request_id = self.client.submit(path.read_bytes(), path.name[:limits.MAX_NAME_CHARS],
                                                 self.options, more)
        except ProtocolError as exc:
            return self._fail(exc.code.value, exc.message)
        except OSError as exc:
            return self._fail(ErrorCode.BAD_IMAGE.value, f"cannot read {path}: {exc}")
        self.state, self.started, self.last_heard = "queued", time.monotonic(), time.monotonic()

    def cancel(self) -> None:
        """Ask the backend to stop; a job not yet accepted is cancelled when its id arrives."""
        self._cancel_requested = True
        if self.job_id is not None and self.client is not None:
            self._send(Cancel(self.job_id))
        elif self.client is None and not self.finished:
            self.state = "cancelled"

    def poll(self) -> None:
        if self.finished or self.client is None:
            return
        if time.monotonic() - self.started > self.connection.job_timeout_s:
            if self.job_id is not None:
                self._send(Cancel(self.job_id))
            return self._fail(ErrorCode.TIMEOUT.value, f"the job took over {self.connection.job_timeout_s:.0f} s "
                              "(the timeout in the add-on preferences); it was cancelled")
        for message in self._receive():
            self._handle(message)
            if self.finished:
                return

    def _handle(self, message: object) -> None:
        if isinstance(message, Accepted) and message.request_id == self.request_id:
            self.job_id, self.queue_position, self.stage = message.job_id, message.queue_position, "queued"
            if self._cancel_requested:
                self._send(Cancel(self.job_id))
        elif isinstance(message, Progress) and message.job_id == self.job_id:
            self.state, self.stage, self.fraction = "running", message.stage, message.fraction
            if message.photo is not None and self.more_photo_paths:
                self.stage += f" (photo {message.photo + 1}/{1 + len(self.more_photo_paths)})"
        elif isinstance(message, Result) and message.job_id == self.job_id:
            self.result, self.state, self.fraction, self.stage = message, "done", 1.0, "done"
            self.close()
        elif isinstance(message, Error) and self._is_mine(message):
            if message.code == ErrorCode.CANCELLED:
                self.state = "cancelled"
                self.close()
            else:
                self._fail(message.code.value, message.message)

    def _is_mine(self, error: Error) -> bool:
        if error.request_id is not None:
            return error.request_id == self.request_id
        if error.job_id is not None:
            return error.job_id == self.job_id
        return True            # an unaddressed error answers our only request (e.g. protocol mismatch)


class StatusCheck(_Exchange):
    """'Test connection': one StatusRequest; `status` is set when the answer arrives."""

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self.status: Status | None = None

    def start(self) -> None:
        try:
            self.client = self.connection.open()
            self.client.send(StatusRequest())
        except ProtocolError as exc:
            return self._fail(exc.code.value, exc.message)
        self.state = "waiting"

    def poll(self) -> None:
        if self.finished or self.client is None:
            return
        for message in self._receive():
            if isinstance(message, Status):
                self.status, self.state = message, "done"
                self.close()
                return
            if isinstance(message, Error):
                return self._fail(message.code.value, message.message)


MODEL_PREFERENCE = ("ict-facekit", "sfm")      # best first; then any other installed model; "builtin" last


def best_model(models: list[str] | tuple[str, ...]) -> str:
    """The model the panel offers first from a server's list: ICT-FaceKit (a whole head with ARKit
    expressions), then the Surrey Face Model, then any other installed model, then the built-in."""
    for name in MODEL_PREFERENCE:
        if name in models:
            return name
    others = [name for name in models if name != "builtin"]
    return others[0] if others else "builtin"


def describe_status(status: Status) -> list[str]:
    """Short lines for the panel: version, devices, workers, queue."""
    busy = sum(1 for w in status.workers if w.get("state") == "busy")
    return [f"backend {status.server_version} (protocol {status.protocol_version})",
            f"devices: {', '.join(status.devices)}; models: {', '.join(status.models)}",
            f"workers: {len(status.workers)} ({busy} busy); queue: {status.queue_depth}",
            f"jobs done {status.jobs_done}, failed {status.jobs_failed}; up {status.uptime_s / 60:.0f} min"]


def default_output_folder(blend_path: str) -> str:
    """Beside the saved .blend (`<name>_facerecon/`), or a temp folder for an unsaved file."""
    if blend_path:
        blend = Path(blend_path)
        return str(blend.parent / f"{blend.stem}_facerecon")
    import tempfile
    return os.path.join(tempfile.gettempdir(), "facerecon")

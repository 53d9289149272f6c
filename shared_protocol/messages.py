"""Every message between the add-on, the CLI client and the backend, and its multipart framing.

Framing (one ZeroMQ multipart message; a ROUTER socket sees the peer identity frame before it):

    frame 0     UTF-8 JSON object: {"protocol_version": "1.0", "type": "<type>", ...fields,
                "payloads": [{"name": str, "size": int}, ...]}
    frame 1..n  binary payloads, in the order and with the sizes the header lists

`encode(message) -> list[bytes]` and `decode(frames) -> Message` are exact inverses for valid
messages. `decode` raises only `ProtocolError`, with a specific `ErrorCode`, for anything else.
Fields a decoder does not know are ignored, so a minor version adds optional fields only:

    1.1   `server_id` (one per server start) in accepted, pong and status: a client whose job the
          answering server never accepted knows the job is lost (the backend restarted)
    1.2   several photos of one person in one `reconstruct` (`photo_names`, one `photo` payload per
          name, at most limits.MAX_PERSON_PHOTOS): one head from all of them; `photo` (the photo's
          index) in progress; `photo_name` in error; error code `no_usable_photo`. A request without
          `photo_names` is the single-photo request of 1.0, answered as before
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence, Union

from .errors import ErrorCode, ProtocolError
from . import limits

PROTOCOL_VERSION = "1.2"
SERVER_ID_CHARS = 64
PROTOCOL_MAJOR = 1

STAGES = ("queued", "decode", "detect", "landmarks", "fit", "bake", "export")
OUTPUT_KINDS = ("obj", "mtl", "png", "json", "neutral_obj", "shape_keys",   # these two: models with expressions
                "glb", "usdc")                     # glTF 2.0 binary; USD crate file (refers to the png beside it)
DEFAULT_OUTPUTS = ("obj", "mtl", "png", "json", "neutral_obj", "shape_keys")  # what a request without outputs gets


def _fail(message: str, code: ErrorCode = ErrorCode.BAD_FIELD) -> ProtocolError:
    return ProtocolError(code, message)


class _Fields:
    """Typed access to a decoded header; every getter raises BAD_FIELD with the field's name."""

    def __init__(self, header: dict[str, Any], type_name: str) -> None:
        self.header = header
        self.type_name = type_name

    def _get(self, name: str) -> Any:
        if name not in self.header:
            raise _fail(f"'{self.type_name}' needs field '{name}'")
        return self.header[name]

    def text(self, name: str, max_chars: int = 4096) -> str:
        value = self._get(name)
        if not isinstance(value, str) or len(value) > max_chars:
            raise _fail(f"field '{name}' must be a string of at most {max_chars} characters")
        return value

    def optional_text(self, name: str, max_chars: int = 4096) -> str | None:
        """A string field that may be absent or null (fields added in a minor version are)."""
        if self.header.get(name) is None:
            return None
        return self.text(name, max_chars)

    def optional_flag(self, name: str, default: bool = False) -> bool:
        """A boolean field that may be absent or null (fields added in a minor version are)."""
        value = self.header.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _fail(f"field '{name}' must be true or false")
        return value

    def integer(self, name: str, low: int, high: int) -> int:
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _fail(f"field '{name}' must be an integer in [{low}, {high}]")
        return value

    def number(self, name: str, low: float, high: float) -> float:
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise _fail(f"field '{name}' must be a number in [{low}, {high}]")
        return float(value)

    def choice(self, name: str, allowed: Sequence[str]) -> str:
        value = self._get(name)
        if value not in allowed:
            raise _fail(f"field '{name}' must be one of {', '.join(allowed)}")
        return value

    def text_list(self, name: str, allowed: Sequence[str] | None = None) -> list[str]:
        value = self._get(name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _fail(f"field '{name}' must be a list of strings")
        if allowed is not None and any(v not in allowed for v in value):
            raise _fail(f"field '{name}' may hold only {', '.join(allowed)}")
        return value

    def obj(self, name: str) -> dict[str, Any]:
        value = self._get(name)
        if not isinstance(value, dict):
            raise _fail(f"field '{name}' must be a JSON object")
        return value


def _check_file_name(name: str) -> str:
    """A bare file name: no folders, no '..', no control characters (keeps writes in their folder)."""
    if (not name or len(name) > limits.MAX_NAME_CHARS or name in (".", "..") or "/" in name
            or "\\" in name or any(ord(c) < 32 for c in name) or ":" in name):
        raise _fail(f"'{name[:60]}' is not a bare file name")
    return name


@dataclass(frozen=True)
class ReconstructOptions:
    """What the client wants. face: index into faces sorted largest first, or -1 for all faces."""

    face: int = 0
    texture_size: int = limits.DEFAULT_TEXTURE_SIZE   # pixels per side
    model: str = "builtin"
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    subdivision: int = 1                              # Loop subdivision levels of the mesh
    lit_texture: bool = False                         # the photo as it is (light, hair, glasses); default: albedo

    def to_json(self) -> dict[str, Any]:
        return {"face": self.face, "texture_size": self.texture_size, "model": self.model,
                "outputs": list(self.outputs), "subdivision": self.subdivision, "lit_texture": self.lit_texture}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "ReconstructOptions":
        f = _Fields(value, "options")
        options = cls(
            face=f.integer("face", -1, 63),
            texture_size=f.integer("texture_size", limits.MIN_TEXTURE_SIZE, limits.MAX_TEXTURE_SIZE),
            model=f.text("model", max_chars=64),
            outputs=tuple(f.text_list("outputs", OUTPUT_KINDS)),
            subdivision=f.integer("subdivision", 0, 2),
            lit_texture=f.optional_flag("lit_texture"),
        )
        if options.texture_size & (options.texture_size - 1):
            raise _fail("field 'texture_size' must be a power of two")
        return options


@dataclass(frozen=True)
class PersonPhoto:
    """One more photo of the person in a ReconstructRequest (1.2): a bare file name and its bytes."""

    name: str
    data: bytes


def _check_photo(data: bytes, label: str) -> bytes:
    if not data:
        raise _fail(f"{label} is empty")
    if len(data) > limits.MAX_PHOTO_BYTES:
        raise _fail(f"{label} is {len(data)} bytes, over the limit of {limits.MAX_PHOTO_BYTES}",
                    ErrorCode.PAYLOAD_TOO_LARGE)
    return data


@dataclass(frozen=True)
class ReconstructRequest:
    """Client -> server: reconstruct the face(s) in one photo, or (1.2, `more_photos` not empty) one
    head from several photos of one person (the largest face of each, or face `options.face`).
    request_id is chosen by the client."""

    TYPE: ClassVar[str] = "reconstruct"
    request_id: str
    photo_name: str
    photo: bytes
    options: ReconstructOptions = field(default_factory=ReconstructOptions)
    more_photos: tuple[PersonPhoto, ...] = ()

    @property
    def photos(self) -> tuple[PersonPhoto, ...]:
        """Every photo of the request, the first one (`photo_name`, `photo`) first."""
        return (PersonPhoto(self.photo_name, self.photo), *self.more_photos)

    @property
    def is_person(self) -> bool:
        return bool(self.more_photos)

    @property
    def photo_bytes(self) -> int:
        return sum(len(p.data) for p in self.photos)

    def header(self) -> dict[str, Any]:
        header = {"request_id": self.request_id, "photo_name": self.photo_name, "options": self.options.to_json()}
        if self.more_photos:
            header["photo_names"] = [p.name for p in self.photos]
        return header

    def payloads(self) -> list[tuple[str, bytes]]:
        return [("photo", p.data) for p in self.photos]

    @classmethod
    def parse(cls, f: _Fields, payloads: list[tuple[str, bytes]]) -> "ReconstructRequest":
        names = f.text_list("photo_names") if f.header.get("photo_names") is not None else None
        count = 1 if names is None else len(names)
        if names is not None and not 1 <= count <= limits.MAX_PERSON_PHOTOS:
            raise _fail(f"field 'photo_names' must list 1 to {limits.MAX_PERSON_PHOTOS} photos")
        if len(payloads) != count or any(name != "photo" for name, _ in payloads):
            raise _fail(f"'reconstruct' carries exactly {count} payload(s) named 'photo', one per photo",
                        ErrorCode.BAD_FRAMES)
        photo_name = _check_file_name(f.text("photo_name", max_chars=limits.MAX_NAME_CHARS))
        if names is None:
            _check_photo(payloads[0][1], "the photo payload")
            return cls(request_id=f.text("request_id", max_chars=128), photo_name=photo_name,
                       photo=payloads[0][1], options=ReconstructOptions.from_json(f.obj("options")))
        for name in names:
            _check_file_name(name)
        if names[0] != photo_name:
            raise _fail("field 'photo_names' must start with 'photo_name'")
        for k, (name, (_, data)) in enumerate(zip(names, payloads)):
            _check_photo(data, f"photo {k + 1} ({name})")
        total = sum(len(data) for _, data in payloads)
        if total > limits.MAX_PERSON_BYTES:
            raise _fail(f"the photos are {total} bytes together, over the limit of {limits.MAX_PERSON_BYTES}",
                        ErrorCode.PAYLOAD_TOO_LARGE)
        options = ReconstructOptions.from_json(f.obj("options"))
        if count > 1 and options.face == -1:
            raise _fail("field 'face' cannot be -1 (every face) with several photos of one person")
        return cls(request_id=f.text("request_id", max_chars=128), photo_name=photo_name, photo=payloads[0][1],
                   options=options, more_photos=tuple(PersonPhoto(n, d) for n, (_, d) in zip(names[1:], payloads[1:])))


def _with_server_id(header: dict[str, Any], server_id: str | None) -> dict[str, Any]:
    return header if server_id is None else {**header, "server_id": server_id}


@dataclass(frozen=True)
class Accepted:
    """Server -> client: the request is queued as job_id; queue_position 0 means running next.
    server_id (1.1): the server instance that holds the job."""

    TYPE: ClassVar[str] = "accepted"
    request_id: str
    job_id: str
    queue_position: int
    server_id: str | None = None

    def header(self) -> dict[str, Any]:
        return _with_server_id({"request_id": self.request_id, "job_id": self.job_id,
                                "queue_position": self.queue_position}, self.server_id)

    @classmethod
    def parse(cls, f: _Fields, payloads: list) -> "Accepted":
        return cls(f.text("request_id", max_chars=128), f.text("job_id", max_chars=128),
                   f.integer("queue_position", 0, 1 << 31), f.optional_text("server_id", SERVER_ID_CHARS))


@dataclass(frozen=True)
class Progress:
    """Server -> client: job_id entered `stage` (one of STAGES); fraction of the whole job, 0..1.
    photo (1.2): in a request with several photos, the index of the photo the stage works on (None:
    all of them, e.g. their joint fit)."""

    TYPE: ClassVar[str] = "progress"
    job_id: str
    stage: str
    fraction: float
    photo: int | None = None

    def header(self) -> dict[str, Any]:
        header: dict[str, Any] = {"job_id": self.job_id, "stage": self.stage, "fraction": self.fraction}
        if self.photo is not None:
            header["photo"] = self.photo
        return header

    @classmethod
    def parse(cls, f: _Fields, payloads: list) -> "Progress":
        photo = None if f.header.get("photo") is None else f.integer("photo", 0, limits.MAX_PERSON_PHOTOS - 1)
        return cls(f.text("job_id", max_chars=128), f.choice("stage", STAGES),
                   f.number("fraction", 0.0, 1.0), photo)


@dataclass(frozen=True)
class ResultFile:
    """One output file: a bare file name, its kind (one of OUTPUT_KINDS) and its bytes."""

    name: str
    kind: str
    data: bytes


@dataclass(frozen=True)
class Result:
    """Server -> client: the finished job's files (for face=-1, one set of files per face)."""

    TYPE: ClassVar[str] = "result"
    job_id: str
    files: tuple[ResultFile, ...]
    summary: dict[str, Any] = field(default_factory=dict)   # small JSON facts: faces, timings

    def header(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "kinds": [f.kind for f in self.files], "summary": self.summary}

    def payloads(self) -> list[tuple[str, bytes]]:
        return [(f.name, f.data) for f in self.files]

    @classmethod
    def parse(cls, f: _Fields, payloads: list[tuple[str, bytes]]) -> "Result":
        kinds = f.text_list("kinds", OUTPUT_KINDS)
        if len(kinds) != len(payloads):
            raise _fail("'kinds' must list one kind per payload", ErrorCode.BAD_FRAMES)
        for name, data in payloads:
            _check_file_name(name)
            if len(data) > limits.MAX_RESULT_FILE_BYTES:
                raise _fail(f"result file {name} is over the limit", ErrorCode.PAYLOAD_TOO_LARGE)
        files = tuple(ResultFile(name, kind, data) for (name, data), kind in zip(payloads, kinds))
        return cls(f.text("job_id", max_chars=128), files, f.obj("summary"))


@dataclass(frozen=True)
class Error:
    """Either direction: a failure with a stable code. job_id/request_id say what failed, if known;
    photo_name (1.2): the photo of a several-photo request that failed, if one did."""

    TYPE: ClassVar[str] = "error"
    code: ErrorCode
    message: str
    job_id: str | None = None
    request_id: str | None = None
    photo_name: str | None = None

    def header(self) -> dict[str, Any]:
        header = {"code": self.code.value, "message": self.message, "job_id": self.job_id,
                  "request_id": self.request_id}
        if self.photo_name is not None:
            header["photo_name"] = self.photo_name
        return header

    @classmethod
    def parse(cls, f: _Fields, payloads: list) -> "Error":
        code = f.choice("code", [c.value for c in ErrorCode])
        job_id = f.header.get("job_id")
        request_id = f.header.get("request_id")
        for name, value in (("job_id", job_id), ("request_id", request_id)):
            if value is not None and (not isinstance(value, str) or len(value) > 128):
                raise _fail(f"field '{name}' must be null or a short string")
        return cls(ErrorCode(code), f.text("message", max_chars=8192), job_id, request_id,
                   f.optional_text("photo_name", limits.MAX_NAME_CHARS))


@dataclass(frozen=True)
class Cancel:
    """Client -> server: cancel job_id (queued: at once; running: at the next stage boundary)."""

    TYPE: ClassVar[str] = "cancel"
    job_id: str

    def header(self) -> dict[str, Any]:
        return {"job_id": self.job_id}

    @classmethod
    def parse(cls, f: _Fields, payloads: list) -> "Cancel":
        return cls(f.text("job_id", max_chars=128))


@dataclass(frozen=True)
class Ping:
    """Either direction: liveness check (heartbeat); the peer answers Pong with the same nonce."""

    TYPE: ClassVar[str] = "ping"
    nonce: int

    def header(self) -> dict[str, Any]:
        return {"nonce": self.nonce}

    @classmethod
    def parse(cls, f: _Fields, payloads: list) -> "Ping":
        return cls(f.integer("nonce", 0, (1 << 53) - 1))


@dataclass(frozen=True)
class Pong:
    """The answer to a Ping. server_id (1.1, from a server): which server instance answered."""

    TYPE: ClassVar[str] = "pong"
    nonce: int
    server_id: str | None = None

    def header(self) -> dict[str, Any]:
        return _with_server_id({"nonce": self.nonce}, self.server_id)

    @classmethod
    def parse(cls, f: _Fields, payloads: list) -> "Pong":
        return cls(f.integer("nonce", 0, (1 << 53) - 1), f.optional_text("server_id", SERVER_ID_CHARS))


@dataclass(frozen=True)
class StatusRequest:
    """Client -> server: ask for Status. Answered even while every worker is busy."""

    TYPE: ClassVar[str] = "status_request"

    def header(self) -> dict[str, Any]:
        return {}

    @classmethod
    def parse(cls, f: _Fields, payloads: list) -> "StatusRequest":
        return cls()


@dataclass(frozen=True)
class Status:
    """Server -> client: versions, devices, models, queue depth and counters."""

    TYPE: ClassVar[str] = "status"
    server_version: str
    devices: tuple[str, ...]
    models: tuple[str, ...]
    workers: tuple[dict[str, Any], ...]     # one per worker: device, state, jobs_done, gpu_memory_mb
    queue_depth: int
    jobs_done: int
    jobs_failed: int
    uptime_s: float
    protocol_version: str = PROTOCOL_VERSION
    server_id: str | None = None            # 1.1: this start of the server

    def header(self) -> dict[str, Any]:
        return _with_server_id({
            "server_version": self.server_version, "server_protocol_version": self.protocol_version,
            "devices": list(self.devices), "models": list(self.models), "workers": list(self.workers),
            "queue_depth": self.queue_depth, "jobs_done": self.jobs_done, "jobs_failed": self.jobs_failed,
            "uptime_s": self.uptime_s}, self.server_id)

    @classmethod
    def parse(cls, f: _Fields, payloads: list) -> "Status":
        workers = f.header.get("workers")
        if not isinstance(workers, list) or not all(isinstance(w, dict) for w in workers):
            raise _fail("field 'workers' must be a list of objects")
        return cls(f.text("server_version", max_chars=64), tuple(f.text_list("devices")),
                   tuple(f.text_list("models")), tuple(workers),
                   f.integer("queue_depth", 0, 1 << 31), f.integer("jobs_done", 0, 1 << 53),
                   f.integer("jobs_failed", 0, 1 << 53), f.number("uptime_s", 0.0, 1e12),
                   f.text("server_protocol_version", max_chars=16), f.optional_text("server_id", SERVER_ID_CHARS))


Message = Union[ReconstructRequest, Accepted, Progress, Result, Error, Cancel, Ping, Pong,
                StatusRequest, Status]
MESSAGE_TYPES: dict[str, type[Message]] = {cls.TYPE: cls for cls in (
    ReconstructRequest, Accepted, Progress, Result, Error, Cancel, Ping, Pong, StatusRequest, Status)}


def encode(message: Message) -> list[bytes]:
    """Message -> multipart frames (header JSON first, then payloads)."""
    payloads = message.payloads() if hasattr(message, "payloads") else []
    header = {"protocol_version": PROTOCOL_VERSION, "type": message.TYPE, **message.header(),
              "payloads": [{"name": name, "size": len(data)} for name, data in payloads]}
    return [json.dumps(header, separators=(",", ":")).encode("utf-8"), *(data for _, data in payloads)]


def _check_version(header: dict[str, Any]) -> None:
    version = header.get("protocol_version")
    if not isinstance(version, str):
        raise _fail("header needs a string 'protocol_version'", ErrorCode.BAD_HEADER)
    major = version.split(".", 1)[0]
    if not major.isdigit():
        raise _fail(f"protocol_version '{version[:16]}' is not MAJOR.MINOR", ErrorCode.BAD_HEADER)
    if int(major) != PROTOCOL_MAJOR:
        raise _fail(f"peer speaks protocol {version[:16]}, this side speaks {PROTOCOL_VERSION}; "
                    "update the add-on or the backend so that both match", ErrorCode.PROTOCOL_MISMATCH)


def _payload_table(header: dict[str, Any], frames: Sequence[bytes | bytearray | memoryview]) -> list[tuple[str, bytes]]:
    table = header.get("payloads")
    if not isinstance(table, list):
        raise _fail("header needs a 'payloads' list", ErrorCode.BAD_HEADER)
    if len(table) != len(frames) - 1:
        raise _fail(f"header lists {len(table)} payloads but {len(frames) - 1} frames follow",
                    ErrorCode.BAD_FRAMES)
    payloads = []
    for entry, data in zip(table, frames[1:]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise _fail("each payload entry needs a 'name' string", ErrorCode.BAD_HEADER)
        size = entry.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _fail("each payload entry needs a non-negative integer 'size'", ErrorCode.BAD_HEADER)
        if size > limits.MAX_RESULT_FILE_BYTES:
            raise _fail(f"payload '{entry['name'][:60]}' declares {size} bytes, over the limit",
                        ErrorCode.PAYLOAD_TOO_LARGE)
        if size != len(data):
            raise _fail(f"payload '{entry['name'][:60]}' declares {size} bytes but carries {len(data)}",
                        ErrorCode.PAYLOAD_SIZE_MISMATCH)
        payloads.append((entry["name"], bytes(data)))
    return payloads


def decode(frames: Sequence[bytes | bytearray | memoryview]) -> Message:
    """Multipart frames -> Message. Raises ProtocolError (never anything else) on any defect."""
    if not isinstance(frames, (list, tuple)) or not frames:
        raise _fail("a message needs at least a header frame", ErrorCode.BAD_FRAMES)
    if len(frames) > limits.MAX_FRAMES:
        raise _fail(f"{len(frames)} frames, over the limit of {limits.MAX_FRAMES}", ErrorCode.BAD_FRAMES)
    if not all(isinstance(f, (bytes, bytearray, memoryview)) for f in frames):
        raise _fail("frames must be bytes", ErrorCode.BAD_FRAMES)
    raw = bytes(frames[0])
    if len(raw) > limits.MAX_HEADER_BYTES:
        raise _fail(f"header is {len(raw)} bytes, over {limits.MAX_HEADER_BYTES}", ErrorCode.PAYLOAD_TOO_LARGE)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(f"header is not UTF-8 JSON ({type(exc).__name__})", ErrorCode.BAD_HEADER) from None
    if not isinstance(header, dict):
        raise _fail("header must be a JSON object", ErrorCode.BAD_HEADER)
    _check_version(header)
    type_name = header.get("type")
    if not isinstance(type_name, str) or type_name not in MESSAGE_TYPES:
        raise _fail(f"unknown message type {str(type_name)[:40]!r}", ErrorCode.UNKNOWN_TYPE)
    cls = MESSAGE_TYPES[type_name]
    payloads = _payload_table(header, frames)
    if cls not in (ReconstructRequest, Result) and payloads:
        raise _fail(f"'{type_name}' carries no payloads", ErrorCode.BAD_FRAMES)
    return cls.parse(_Fields(header, type_name), payloads)

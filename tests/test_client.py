"""The shared DEALER client against a real ROUTER socket on loopback (framing, heartbeat, errors)."""
from __future__ import annotations

import threading

import pytest
import zmq

from shared_protocol import (Accepted, Error, ErrorCode, Ping, Pong, Progress, ProtocolError, ReconstructOptions,
                             ReconstructRequest, Result, ResultFile, Status, StatusRequest, decode, encode, limits)
from shared_protocol.client import Client


class TinyRouter:
    """Answers like a backend would: Pong, Status, and accepted -> progress -> result."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.received: list = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop.is_set():
            if not self.socket.poll(50):
                continue
            identity, *frames = self.socket.recv_multipart()
            message = decode(frames)
            self.received.append(message)
            replies = []
            if isinstance(message, Ping):
                replies = [Pong(message.nonce)]
            elif isinstance(message, StatusRequest):
                replies = [Status("test", ("cpu",), ("builtin",), (), 0, 0, 0, 1.0)]
            elif isinstance(message, ReconstructRequest) and message.photo_name == "bad.jpg":
                replies = [Error(ErrorCode.NO_FACE, "bad.jpg: no face", request_id=message.request_id)]
            elif isinstance(message, ReconstructRequest):
                replies = [Accepted(message.request_id, "job-1", 0), Progress("job-1", "bake", 0.5),
                           Result("job-1", (ResultFile("x.png", "png", message.photo),))]
            for reply in replies:
                self.socket.send_multipart([identity, *encode(reply)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.socket.close(0)
        self.context.term()


@pytest.fixture
def router():
    server = TinyRouter()
    yield server
    server.close()


def test_ping_status_and_reconstruct_round_trip(router):
    with Client(router.address) as client:
        assert client.ping() < 1.0
        assert client.status().models == ("builtin",)
        seen = []
        result = client.reconstruct(b"photo-bytes", "me.jpg", on_progress=seen.append)
        assert result.files[0].data == b"photo-bytes"
        assert [p.stage for p in seen] == ["bake"]
        with pytest.raises(ProtocolError) as info:
            client.reconstruct(b"x", "bad.jpg")
        assert info.value.code == ErrorCode.NO_FACE


def test_unreachable_backend_times_out_with_a_clear_message():
    with Client("tcp://127.0.0.1:1") as client:
        with pytest.raises(ProtocolError) as info:
            client.status(timeout_s=0.3)
    assert info.value.code == ErrorCode.TIMEOUT
    assert "facerecon-backend serve" in info.value.message


def test_non_blocking_poll_returns_none_then_messages(router):
    with Client(router.address) as client:
        assert client.poll(0) is None
        client.submit(b"p", "me.jpg")
        kinds = []
        while len(kinds) < 3:
            message = client.poll(2000)
            assert message is not None
            kinds.append(type(message).__name__)
        assert kinds == ["Accepted", "Progress", "Result"]


@pytest.mark.parametrize("size", [limits.MAX_PHOTO_BYTES + 1, limits.MAX_PHOTO_BYTES + limits.MAX_HEADER_BYTES + 1],
                         ids=["40MiB+1", "over-ZMQ_MAXMSGSIZE"])
def test_a_photo_over_the_limit_is_refused_before_it_is_sent(router, size):
    # Over ZMQ_MAXMSGSIZE the server drops the connection unread: the client used to wait 20 s and
    # then ask whether the backend was running.
    with Client(router.address) as client:
        assert client.ping() < 1.0
        with pytest.raises(ProtocolError) as info:
            client.reconstruct(b"\0" * size, "huge.jpg", timeout_s=20)
    assert info.value.code == ErrorCode.PAYLOAD_TOO_LARGE
    assert "huge.jpg" in info.value.message and f"{limits.MAX_PHOTO_BYTES:,} bytes" in info.value.message
    assert not any(isinstance(m, ReconstructRequest) for m in router.received)


def test_the_addon_refuses_a_photo_over_the_limit_with_payload_too_large(tmp_path):
    from blender_addon.transport import Connection, ReconstructJob
    photo = tmp_path / "huge.jpg"
    with open(photo, "wb") as file:
        file.truncate(limits.MAX_PHOTO_BYTES + limits.MAX_HEADER_BYTES + 1)       # sparse: no disk used
    job = ReconstructJob(Connection("tcp://127.0.0.1:1"), str(photo), ReconstructOptions())
    job.start()
    assert job.state == "failed" and job.error_code == ErrorCode.PAYLOAD_TOO_LARGE.value
    assert "huge.jpg" in job.error and f"{limits.MAX_PHOTO_BYTES:,} bytes" in job.error

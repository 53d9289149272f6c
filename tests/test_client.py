"""The shared DEALER client against a real ROUTER socket on loopback (framing, heartbeat, errors)."""
from __future__ import annotations

import threading
import time

import pytest
import zmq

from shared_protocol import (Accepted, Error, ErrorCode, Ping, Pong, Progress, ProtocolError, ReconstructOptions,
                             ReconstructRequest, Result, ResultFile, Status, StatusRequest, decode, encode, limits)
from shared_protocol.client import Client


class TinyRouter:
    """Answers like a backend would: Pong, Status, and accepted -> progress -> result. Photos named
    restart.jpg (accepted, then the "server" restarts: a new server_id), dropped.jpg (never answered)
    and slow.jpg (result after 2.5 s) play the backend's faults."""

    def __init__(self) -> None:
        self.server_id = "server-start-1"
        self.later: list[tuple[float, bytes, object]] = []       # (when, identity, reply)
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
            for when, identity, reply in [item for item in self.later if item[0] <= time.monotonic()]:
                self.later.remove((when, identity, reply))
                self.socket.send_multipart([identity, *encode(reply)])
            if not self.socket.poll(50):
                continue
            identity, *frames = self.socket.recv_multipart()
            message = decode(frames)
            self.received.append(message)
            replies = []
            if isinstance(message, Ping):
                replies = [Pong(message.nonce, self.server_id)]
            elif isinstance(message, ReconstructRequest) and message.photo_name == "dropped.jpg":
                replies = []
            elif isinstance(message, ReconstructRequest) and message.photo_name == "restart.jpg":
                replies = [Accepted(message.request_id, "job-1", 0, self.server_id)]
                self.server_id = "server-start-2"
            elif isinstance(message, ReconstructRequest) and message.photo_name == "slow.jpg":
                replies = [Accepted(message.request_id, "job-1", 0, self.server_id)]
                self.later.append((time.monotonic() + 2.5, identity, Result("job-1", ())))
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


@pytest.mark.parametrize("photo_name, why", [("restart.jpg", "restarted"), ("dropped.jpg", "never received")])
def test_a_job_the_backend_lost_is_reported_within_seconds_not_at_the_timeout(router, photo_name, why):
    with Client(router.address) as client:
        start = time.monotonic()
        with pytest.raises(ProtocolError) as info:
            client.reconstruct(b"photo", photo_name, timeout_s=60)
        assert time.monotonic() - start < 10                     # a heartbeat or two, not 60 s
    assert info.value.code == ErrorCode.JOB_LOST
    assert why in info.value.message and "submit the photo again" in info.value.message


def test_a_slow_job_on_the_same_server_is_not_taken_for_lost(router):
    with Client(router.address) as client:
        client.send_ping()                                        # its pong says nothing of the request
        result = client.reconstruct(b"photo", "slow.jpg", timeout_s=20)
        assert result.job_id == "job-1"
        assert sum(isinstance(m, Ping) for m in router.received) >= 2    # heartbeats while it waited
        assert client.server_id == "server-start-1"


def test_the_non_blocking_client_reports_a_lost_job_as_an_error_for_that_request(router):
    with Client(router.address) as client:
        kept = client.submit(b"photo", "slow.jpg")
        lost = client.submit(b"photo", "dropped.jpg")
        client.send_ping()
        seen = []
        while len(seen) < 4:
            message = client.poll(3000)
            assert message is not None, seen
            seen.append(message)
        errors = [m for m in seen if isinstance(m, Error)]
        assert [(e.code, e.request_id) for e in errors] == [(ErrorCode.JOB_LOST, lost)]
        assert any(isinstance(m, Result) for m in seen) and any(isinstance(m, Accepted) and m.request_id == kept
                                                               for m in seen)

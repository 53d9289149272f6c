"""The backend server end to end: real `facerecon-backend serve` processes, real sockets on 127.0.0.1."""
from __future__ import annotations

import io
import json
import os
import random
import signal
import time
from collections import Counter, defaultdict

import pytest
import zmq
from PIL import Image

from backend_process import BackendProcess, accepted_job, wait_for
from shared_protocol import (Accepted, Error, ErrorCode, PROTOCOL_VERSION, Progress, ProtocolError,
                             ReconstructOptions, ReconstructRequest, Result, decode, encode, limits)
from shared_protocol.client import Client, load_curve_keys, read_server_public_key

QUICK = ReconstructOptions(texture_size=256, subdivision=0, outputs=("json",))


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    server = BackendProcess(tmp_path_factory.mktemp("backend") / "serve.log", workers=2).start()
    yield server
    assert server.stop() == 0, server.log()


def test_round_trip_matches_batch_cli(backend, grace_hopper_bytes, tmp_path):
    from backend_server.cli.facerecon import main as cli_main
    photo = tmp_path / "grace_hopper.jpg"
    photo.write_bytes(grace_hopper_bytes)
    assert cli_main(["reconstruct", str(photo), "-o", str(tmp_path / "cli"), "-q"]) == 0

    stages = []
    with Client(backend.address) as client:
        result = client.reconstruct(grace_hopper_bytes, "grace_hopper.jpg",
                                    on_progress=lambda p: stages.append(p.stage))
    assert stages == ["queued", "decode", "detect", "landmarks", "fit", "bake", "export"]
    files = {f.name: f.data for f in result.files}
    assert sorted(files) == sorted(p.name for p in (tmp_path / "cli").iterdir())
    for name in ("grace_hopper.obj", "grace_hopper.mtl", "grace_hopper.png"):
        assert files[name] == (tmp_path / "cli" / name).read_bytes(), name
    served, batch = json.loads(files["grace_hopper.json"]), json.loads((tmp_path / "cli/grace_hopper.json").read_text())
    served.pop("timings_ms"), batch.pop("timings_ms")
    assert served == batch
    assert result.summary["faces"] == 1


def fuzz_messages(rng: random.Random, count: int) -> list[list[bytes]]:
    """Malformed multipart messages: each must be answered with an Error."""
    good = encode(ReconstructRequest("r", "a.jpg", b"\xff\xd8photo", QUICK))
    header = json.loads(good[0])

    def variant(**changes) -> bytes:
        value = {**header, **changes}
        return json.dumps({k: v for k, v in value.items() if v is not ...}).encode()

    makers = [
        lambda: [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 4))],
        lambda: [good[0][:rng.randint(0, len(good[0]) - 1)], good[1]],                       # cut JSON
        lambda: [variant(protocol_version=rng.choice(["2.0", "0.9", "x", 1, None, ...])), good[1]],
        lambda: [variant(type=rng.choice(["reconstructs", "", 7, None, ...])), good[1]],
        lambda: [variant(payloads=[{"name": "photo", "size": rng.choice([1 << 40, -1, "9", None])}]), good[1]],
        lambda: [variant(payloads=[{"name": "photo", "size": len(good[1]) + rng.randint(1, 9)}]), good[1]],
        lambda: [good[0]] + [good[1]] * rng.randint(2, 70),                                  # frame count
        lambda: [good[0]],                                                                    # no payload
        lambda: [variant(options={**header["options"], rng.choice(["face", "texture_size", "model",
                 "outputs", "subdivision"]): rng.choice([-9, 3000, "x", None, [1], 1.5])}), good[1]],
        lambda: [variant(request_id=rng.choice([None, 5, "x" * 500])), good[1]],
        lambda: [variant(photo_name=rng.choice(["../x.jpg", "", "a/b", 3])), good[1]],
        lambda: [json.dumps(rng.choice([[], 5, "s", None])).encode()],                       # not an object
        lambda: [b"\xff\xfe" + rng.randbytes(8)],                                              # not UTF-8
        lambda: [encode(Accepted("r", "j", 0))[0]],                                            # wrong direction
        lambda: [json.dumps({"protocol_version": PROTOCOL_VERSION, "type": "cancel", "payloads": []}).encode()],
    ]
    return [rng.choice(makers)() for _ in range(count)]


def test_fuzz_never_kills_the_server(backend, grace_hopper_bytes):
    messages = fuzz_messages(random.Random(20261124), 1200)
    context = zmq.Context.instance()
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(backend.address)
    for frames in messages:
        raw.send_multipart(frames)
    errors = Counter()
    end = time.monotonic() + 60
    while sum(errors.values()) < len(messages) and time.monotonic() < end:
        if raw.poll(200):
            message = decode(raw.recv_multipart())
            assert isinstance(message, Error), message
            errors[message.code] += 1
    raw.close()
    assert sum(errors.values()) == len(messages), errors
    assert set(errors) <= {ErrorCode.BAD_FRAMES, ErrorCode.BAD_HEADER, ErrorCode.UNKNOWN_TYPE,
                           ErrorCode.BAD_FIELD, ErrorCode.PAYLOAD_SIZE_MISMATCH, ErrorCode.PAYLOAD_TOO_LARGE,
                           ErrorCode.PROTOCOL_MISMATCH, ErrorCode.UNKNOWN_MODEL}
    assert len(errors) >= 6

    # A frame over ZMQ_MAXMSGSIZE: the server drops the connection without reading it into memory.
    huge = context.socket(zmq.DEALER)
    huge.setsockopt(zmq.LINGER, 0)
    huge.connect(backend.address)
    huge.send_multipart([good_header(), b"\0" * (limits.MAX_PHOTO_BYTES + limits.MAX_HEADER_BYTES + 1)])
    assert not huge.poll(1000)
    huge.close()

    with Client(backend.address) as client:
        result = client.reconstruct(grace_hopper_bytes, "after_fuzz.jpg", QUICK, timeout_s=60)
    assert [f.name for f in result.files] == ["after_fuzz.json"]


def good_header() -> bytes:
    return encode(ReconstructRequest("r", "a.jpg", b"x", QUICK))[0]


def test_eight_clients_each_get_every_answer_exactly_once(backend, grace_hopper_bytes):
    clients = [Client(backend.address) for _ in range(8)]
    sent: dict[int, dict[str, str]] = defaultdict(dict)         # client -> request_id -> photo stem
    for k in range(25):
        for c, client in enumerate(clients):
            stem = f"c{c}_j{k}"
            sent[c][client.submit(grace_hopper_bytes, f"{stem}.jpg", QUICK)] = stem
    job_owner: dict[str, tuple[int, str]] = {}
    answers: Counter = Counter()
    end = time.monotonic() + 240
    while sum(answers.values()) < 200 and time.monotonic() < end:
        for c, client in enumerate(clients):
            message = client.poll(5)
            if isinstance(message, Accepted):
                assert message.request_id in sent[c] and message.job_id not in job_owner
                job_owner[message.job_id] = (c, sent[c][message.request_id])
            elif isinstance(message, Result):
                owner, stem = job_owner[message.job_id]
                assert owner == c and [f.name for f in message.files] == [f"{stem}.json"]
                answers[message.job_id] += 1
            elif isinstance(message, Error):
                raise AssertionError(message)
    for client in clients:
        assert client.poll(300) is None                           # nothing extra arrives
        client.close()
    assert len(job_owner) == 200 and len(answers) == 200 and set(answers.values()) == {1}


def test_a_single_photo_is_not_starved_by_a_batch(backend, grace_hopper_bytes):
    wait_until_idle(backend)
    done_before = backend.status().jobs_done
    with Client(backend.address) as batch, Client(backend.address) as single:
        for k in range(30):
            batch.submit(grace_hopper_bytes, f"b{k}.jpg", QUICK)
        accepted = 0
        while accepted < 30:
            message = batch.poll(5000)
            assert isinstance(message, (Accepted, Progress, Result)), message
            accepted += isinstance(message, Accepted)
        single_job = accepted_job(single, single.submit(grace_hopper_bytes, "single.jpg", QUICK))
        wait_for(single, lambda m: isinstance(m, Result) and m.job_id == single_job)
        batch_done = 0
        while (message := batch.poll(0)) is not None:
            batch_done += isinstance(message, Result)
        assert batch_done <= 6, f"{batch_done} batch jobs finished before the single photo"
    # The batch client is gone: its queued jobs are dropped, not run for nobody.
    wait_until_idle(backend, timeout_s=5)
    assert backend.status().jobs_done < 30 + done_before + 1


def wait_until_idle(backend, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        status = backend.status()
        if status.queue_depth == 0 and all(w["state"] == "idle" for w in status.workers):
            return
        time.sleep(0.05)
    raise AssertionError(f"backend still busy: {status}")


def running_worker(client: Client, job_id: str) -> dict:
    """The worker running job_id, as the job's own client sees it (others see no job ids)."""
    for _ in range(50):
        for worker in client.status().workers:
            if worker["job_id"] == job_id:
                return worker
        time.sleep(0.02)
    raise AssertionError(f"no worker runs {job_id}")


def test_status_answers_while_busy_and_cancel_queued_and_running(backend, grace_hopper_bytes):
    slow = ReconstructOptions(texture_size=4096)
    wait_until_idle(backend)
    with Client(backend.address) as client:
        running = [accepted_job(client, client.submit(grace_hopper_bytes, f"slow{k}.jpg", slow)) for k in range(2)]
        queued = accepted_job(client, client.submit(grace_hopper_bytes, "queued.jpg", slow))
        # Each Status comes at once while both workers are busy. CI once saw the second worker idle
        # here (cause not found): a few are asked for, which passes only if the second job was
        # merely not yet handed out; one that ended early keeps the queued job from waiting and
        # fails with the server's log.
        for _ in range(10):
            start = time.monotonic()
            status = client.status(timeout_s=2)
            assert time.monotonic() - start < 1.0
            if [w["state"] for w in status.workers] == ["busy", "busy"] and status.queue_depth == 1:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"{status}\n{backend.log()[-6000:]}")

        client.cancel(queued)
        cancelled = wait_for(client, lambda m: isinstance(m, (Error, Result)) and m.job_id == queued, 5)
        assert isinstance(cancelled, Error) and cancelled.code == ErrorCode.CANCELLED

        client.cancel(running[0])
        answer = wait_for(client, lambda m: isinstance(m, (Error, Result)) and m.job_id == running[0])
        assert isinstance(answer, Error) and answer.code == ErrorCode.CANCELLED, answer
        assert isinstance(wait_for(client, lambda m: isinstance(m, (Error, Result)) and m.job_id == running[1]),
                          Result)

        client.cancel("no-such-job")
        unknown = wait_for(client, lambda m: isinstance(m, Error), 5)
        assert unknown.code == ErrorCode.UNKNOWN_JOB


def test_a_killed_worker_fails_its_job_and_is_restarted(backend, grace_hopper_bytes):
    wait_until_idle(backend)
    with Client(backend.address) as client:
        job = accepted_job(client, client.submit(grace_hopper_bytes, "doomed.jpg",
                                                 ReconstructOptions(texture_size=4096)))
        wait_for(client, lambda m: isinstance(m, Progress) and m.job_id == job and m.stage == "bake")
        worker = running_worker(client, job)
        os.kill(worker["pid"], signal.SIGKILL)
        failure = wait_for(client, lambda m: isinstance(m, (Error, Result)) and m.job_id == job, 10)
        assert isinstance(failure, Error) and failure.code == ErrorCode.WORKER_FAILED, failure
        assert "signal 9" in failure.message

        result = client.reconstruct(grace_hopper_bytes, "next.jpg", QUICK, timeout_s=60)
        assert [f.name for f in result.files] == ["next.json"]
        end = time.monotonic() + 60
        while time.monotonic() < end:
            slot = next(w for w in backend.status().workers if w["name"] == worker["name"])
            if slot["state"] == "idle":
                break
            time.sleep(0.2)
        assert slot["restarts"] == 1 and slot["state"] == "idle" and slot["pid"] != worker["pid"]
        assert backend.status().jobs_failed >= 1


def test_full_queue_answers_busy_at_once(tmp_path, grace_hopper_bytes):
    server = BackendProcess(tmp_path / "serve.log", "--queue-size", "2", workers=1).start()
    try:
        with Client(server.address) as client:
            requests = [client.submit(grace_hopper_bytes, f"q{k}.jpg", QUICK) for k in range(8)]
            first: dict[str, object] = {}
            end = time.monotonic() + 60
            finals = 0
            while finals < 8 and time.monotonic() < end:
                message = client.poll(100)
                if isinstance(message, (Accepted, Error)) and message.request_id in requests:
                    assert message.request_id not in first
                    first[message.request_id] = message
                    finals += isinstance(message, Error)
                elif isinstance(message, Result):
                    finals += 1
            busy = [m for m in first.values() if isinstance(m, Error)]
            assert len(first) == 8 and finals == 8
            assert busy and all(m.code == ErrorCode.BUSY and "queue depth" in m.message for m in busy)
    finally:
        assert server.stop() == 0


def test_sigterm_finishes_the_running_job_refuses_new_ones_and_exits_0(tmp_path, grace_hopper_bytes):
    server = BackendProcess(tmp_path / "serve.log", workers=1).start()
    with Client(server.address) as client:
        job = accepted_job(client, client.submit(grace_hopper_bytes, "last.jpg", ReconstructOptions(texture_size=4096)))
        wait_for(client, lambda m: isinstance(m, Progress) and m.job_id == job)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = client.submit(grace_hopper_bytes, "late.jpg", QUICK)
        refused = wait_for(client, lambda m: isinstance(m, Error) and m.request_id == late, 10)
        assert refused.code == ErrorCode.SHUTTING_DOWN
        assert isinstance(wait_for(client, lambda m: isinstance(m, (Error, Result)) and m.job_id == job), Result)
    assert server.process.wait(30) == 0
    assert "stopped: 1 done" in server.log()


def test_curve_admits_only_authorised_keys(tmp_path, grace_hopper_bytes):
    from backend_server.cli.backend import main as backend_main
    keys = tmp_path / "keys"
    assert backend_main(["keys", "generate", "--dir", str(keys)]) == 0
    assert backend_main(["keys", "generate", "--dir", str(keys), "--client", "alice"]) == 0
    assert backend_main(["keys", "generate", "--dir", str(keys), "--client", "alice"]) == 1   # no overwrite
    server_key = read_server_public_key(str(keys / "server.key"))
    alice = {"server_public_key": server_key, "client_keys": load_curve_keys(keys / "clients/alice.key_secret")}
    server = BackendProcess(tmp_path / "serve.log", "--keys", str(keys), workers=1).start(client_kwargs=alice)
    try:
        with Client(server.address, **alice) as client:
            result = client.reconstruct(grace_hopper_bytes, "alice.jpg", QUICK, timeout_s=60)
        assert [f.name for f in result.files] == ["alice.json"]
        for stranger in ({"server_public_key": server_key}, {}):     # unknown key; no CURVE at all
            with Client(server.address, **stranger) as client:
                with pytest.raises(ProtocolError) as refused:
                    client.submit(grace_hopper_bytes, "mallory.jpg", QUICK)
                    client.status(timeout_s=2)
                assert refused.value.code in (ErrorCode.TIMEOUT, ErrorCode.UNREACHABLE)
        assert "mallory" not in server.log()
    finally:
        assert server.stop() == 0


def test_network_bind_without_keys_is_refused(capsys):
    from backend_server.cli.backend import main as backend_main
    assert backend_main(["serve", "--bind", "tcp://*:5555"]) == 2
    assert "without authentication" in capsys.readouterr().err


def test_several_photos_of_one_person_make_one_head_with_progress_per_photo(backend, grace_hopper_bytes):
    from shared_protocol import PersonPhoto
    mirrored = io.BytesIO()
    Image.open(io.BytesIO(grace_hopper_bytes)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored, "PNG")
    progress = []
    with Client(backend.address) as client:
        result = client.reconstruct(grace_hopper_bytes, "grace.jpg", QUICK, on_progress=progress.append,
                                    more_photos=(PersonPhoto("grace_mirrored.png", mirrored.getvalue()),))
        with pytest.raises(ProtocolError) as info:
            client.reconstruct(grace_hopper_bytes, "grace.jpg", QUICK,
                               more_photos=(PersonPhoto("notes.jpg", b"not a photo"),))
    assert info.value.code == ErrorCode.BAD_IMAGE and info.value.photo_name == "notes.jpg"
    assert "notes.jpg" in info.value.message
    seen = [(p.stage, p.photo) for p in progress]
    assert seen[0] == ("queued", None)
    # the photos are located in parallel: each photo's stages in order, the photos in any order
    for k in (0, 1):
        assert [s for s, photo in seen if photo == k and s in ("decode", "detect", "landmarks")] == \
            ["decode", "detect", "landmarks"]
    assert ("fit", None) in seen and ("bake", 1) in seen and seen[-1] == ("export", None)
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions)
    assert [f.name for f in result.files] == ["grace.json"] and result.summary["used_photos"] == [0, 1]
    facts = json.loads(result.files[0].data)
    assert [p["name"] for p in facts["person"]["photos"]] == ["grace.jpg", "grace_mirrored.png"]

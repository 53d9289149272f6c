"""The server under load, faults and bad input (issue 14): real `facerecon-backend serve` processes,
real ZeroMQ sockets on 127.0.0.1. Each test fails on the defect it names."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import zmq

from backend_process import BackendProcess, accepted_job, wait_for
from shared_protocol import (Accepted, Error, ErrorCode, ProtocolError, ReconstructOptions, ReconstructRequest, Result,
                             decode, encode)
from shared_protocol.client import Client

QUICK = ReconstructOptions(texture_size=256, subdivision=0, outputs=("json",))
SLOW = ReconstructOptions(texture_size=4096)           # ~10 s of one CPU worker: keeps it busy


def first_answers(client: Client, request_ids: list[str], timeout_s: float = 60.0) -> dict[str, object]:
    """The Accepted or Error that answers each request (other messages are skipped)."""
    wanted, answers = set(request_ids), {}
    end = time.monotonic() + timeout_s
    while len(answers) < len(wanted) and time.monotonic() < end:
        message = client.poll(100)
        if isinstance(message, (Accepted, Error)) and message.request_id in wanted:
            answers.setdefault(message.request_id, message)
    assert len(answers) == len(wanted), f"{len(answers)} of {len(wanted)} requests answered"
    return answers


def test_one_clients_batch_of_600_leaves_room_for_another_clients_photo(tmp_path, grace_hopper_bytes):
    server = BackendProcess(tmp_path / "serve.log", "--drain-timeout", "1", workers=1).start()
    try:
        with Client(server.address) as batch, Client(server.address) as single:
            requests = [batch.submit(grace_hopper_bytes, "slow.jpg", SLOW)]           # the worker is busy
            requests += [batch.submit(grace_hopper_bytes, f"b{k}.jpg", QUICK) for k in range(599)]
            answers = first_answers(batch, requests)
            busy = [m for m in answers.values() if isinstance(m, Error)]
            accepted = len(answers) - len(busy)
            print(f"batch of 600: {accepted} accepted, {len(busy)} busy")
            assert busy and all(m.code == ErrorCode.BUSY for m in busy)
            request = single.submit(grace_hopper_bytes, "single.jpg", QUICK)
            answer = first_answers(single, [request], 10)[request]
            print(f"second client: {answer}")
            assert isinstance(answer, Accepted), answer
            assert answer.queue_position == 1                   # after one job of the batch (round robin)
            assert accepted <= 1 + 512 // 4                      # the running job and the batch's share
            assert all("this client's share" in m.message and "--client-share" in m.message for m in busy)
    finally:
        assert server.stop() == 0, server.log()


def test_fair_queue_bounds_each_clients_share_of_jobs_and_bytes():
    from backend_server.server.scheduler import FairQueue, Job
    from shared_protocol import ReconstructRequest

    def job(client: bytes, size: int) -> Job:
        return Job(client, ReconstructRequest("r", "a.jpg", b"x" * size, QUICK))

    queue = FairQueue(max_jobs=8, max_bytes=1000, client_share=0.25)
    for _ in range(2):
        assert queue.refusal(b"a", 10) is None
        queue.push(job(b"a", 10))
    assert "this client's share" in queue.refusal(b"a", 10)          # 2 of 8 jobs
    assert queue.refusal(b"b", 240) is None
    queue.push(job(b"b", 240))
    assert "this client's share" in queue.refusal(b"b", 20)          # 260 of 1000 bytes
    assert queue.refusal(b"c", 10) is None                              # a third client gets in
    queue.pop(), queue.pop()
    assert queue.refusal(b"a", 10) is None and queue.refusal(b"b", 20) is None


def test_client_share_out_of_range_is_refused(capsys):
    from backend_server.cli.backend import main as backend_main
    assert backend_main(["serve", "--client-share", "0"]) == 2
    assert "--client-share must be in (0, 1]" in capsys.readouterr().err


def wait_until_settled(server: BackendProcess, jobs: int, done_before: int, timeout_s: float = 150.0,
                       idle_s: float = 3.0):
    """Once the server holds all `jobs` (queued, running or done since done_before), wait until they
    are all done, or the workers have stayed idle for idle_s with jobs still queued (held back);
    returns the last Status."""
    end, idle_since = time.monotonic() + timeout_s, None
    while time.monotonic() < end:
        status = server.status()
        busy = sum(w["state"] == "busy" for w in status.workers)
        seen = status.jobs_done - done_before + status.queue_depth + busy
        if seen >= jobs and status.queue_depth + busy == 0:
            return status
        idle_since = (idle_since or time.monotonic()) if seen >= jobs and busy == 0 else None
        if idle_since and time.monotonic() - idle_since > idle_s:
            return status
        time.sleep(0.3)
    raise AssertionError(f"the server did not settle within {timeout_s} s: {status}")


def test_a_client_that_never_reads_holds_bounded_server_memory(tmp_path, grace_hopper_bytes):
    server = BackendProcess(tmp_path / "serve.log", workers=1).start()
    full = ReconstructOptions()                         # 2048² texture: ~3 MB of files per result
    jobs = 20
    try:
        with Client(server.address) as warm:            # the first 2048² job builds its UV raster
            warm.reconstruct(grace_hopper_bytes, "warm.jpg", full, timeout_s=120)
        before = server.rss_mb()
        # A client that reads nothing (a stopped process, a frozen script): its ZeroMQ takes one
        # message, then TCP pushes back on the server.
        sleeper = zmq.Context.instance().socket(zmq.DEALER)
        sleeper.setsockopt(zmq.RCVHWM, 1)
        sleeper.setsockopt(zmq.LINGER, 0)
        sleeper.connect(server.address)
        requests = [f"n{k}" for k in range(jobs)]
        for request_id in requests:
            sleeper.send_multipart(encode(ReconstructRequest(request_id, f"{request_id}.jpg", grace_hopper_bytes,
                                                             full)))
        status = wait_until_settled(server, jobs, done_before=1)
        grown = server.rss_mb() - before
        print(f"never-reading client: {status.jobs_done - 1} of {jobs} jobs run, server RSS +{grown:.0f} MB")
        assert grown < 30, f"server RSS grew {grown:.0f} MB for a client that reads nothing"
        # It reads at last: every job is answered, exactly once (held back, not dropped).
        answers: Counter = Counter()
        job_of = {}
        end = time.monotonic() + 150
        while len(answers) < jobs and time.monotonic() < end:
            if not sleeper.poll(100):
                continue
            message = decode(sleeper.recv_multipart())
            if isinstance(message, Accepted) and message.request_id in requests:
                job_of[message.job_id] = message.request_id
            elif isinstance(message, (Result, Error)) and message.job_id in job_of:
                assert isinstance(message, Result), message
                answers[message.job_id] += 1
        sleeper.close()
        assert len(answers) == jobs and set(answers.values()) == {1}
        assert "is not reading" in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_a_server_restarted_while_clients_wait_makes_them_report_job_lost(tmp_path, grace_hopper_bytes):
    from blender_addon.transport import Connection, ReconstructJob
    server = BackendProcess(tmp_path / "serve.log", workers=1).start()
    photo = tmp_path / "slow.jpg"
    photo.write_bytes(grace_hopper_bytes)
    # The add-on's job runs (SLOW); a script's blocking reconstruct waits in the queue behind it.
    addon = ReconstructJob(Connection(server.address, connect_timeout_s=60, job_timeout_s=300), str(photo), SLOW)
    addon.start()
    end = time.monotonic() + 30
    while addon.state != "running" and time.monotonic() < end:
        addon.poll()
        time.sleep(0.05)
    assert addon.state == "running", addon.error
    outcome: dict = {}

    def script() -> None:
        with Client(server.address) as client:
            try:
                client.reconstruct(grace_hopper_bytes, "queued.jpg", QUICK, timeout_s=300)
            except ProtocolError as exc:
                outcome["script"], outcome["script_at"] = exc, time.monotonic()

    def blender_timer(until: float) -> None:            # Blender polls the add-on's job every 0.1 s
        while not addon.finished and time.monotonic() < until:
            addon.poll()
            time.sleep(0.1)
        outcome["addon_at"] = time.monotonic()

    waiting = threading.Thread(target=script, daemon=True)
    waiting.start()
    end = time.monotonic() + 10
    while server.status().queue_depth == 0 and time.monotonic() < end:
        time.sleep(0.05)
    try:
        server.kill()                                  # the backend crashes ...
        killed = time.monotonic()
        polling = threading.Thread(target=blender_timer, args=(killed + 30,), daemon=True)
        polling.start()
        server.start()                                 # ... and is started again on the same address
        ready = time.monotonic()
        polling.join(max(0.0, killed + 30 - time.monotonic()))
        waiting.join(max(0.0, killed + 30 - time.monotonic()))
        print(f"restarted {ready - killed:.1f} s after the kill; add-on: {addon.state} {addon.error_code} "
              f"{outcome['addon_at'] - killed:.1f} s after the kill; script: {outcome.get('script')!r} "
              f"{outcome.get('script_at', float('nan')) - killed:.1f} s after the kill")
        assert addon.state == "failed" and addon.error_code == ErrorCode.JOB_LOST.value, addon.error
        assert "restarted" in addon.error and "again" in addon.error
        assert outcome["script"].code == ErrorCode.JOB_LOST and "restarted" in outcome["script"].message
    finally:
        addon.close()
        assert server.stop() == 0, server.log()


def test_secret_keys_are_private_from_creation_and_names_stay_in_the_keys_folder(tmp_path, monkeypatch, capsys):
    import builtins
    import stat

    import zmq.auth
    from backend_server.cli.backend import main as backend_main
    created: dict[str, int] = {}                  # secret key file -> its mode right after it was created

    def note(path) -> None:
        path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
        if path.endswith(".key_secret") and path not in created and os.path.exists(path):
            created[path] = stat.S_IMODE(os.stat(path).st_mode)

    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)
        note(file)
        return handle

    def spy_os_open(path, *args, **kwargs):
        fd = real_os_open(path, *args, **kwargs)
        note(path)
        return fd

    monkeypatch.setattr(builtins, "open", spy_open)             # whichever way the key files are made
    monkeypatch.setattr(os, "open", spy_os_open)
    keys, umask = tmp_path / "keys", os.umask(0o022)
    try:
        assert backend_main(["keys", "generate", "--dir", str(keys)]) == 0
        assert backend_main(["keys", "generate", "--dir", str(keys), "--client", "alice.smith"]) == 0
    finally:
        os.umask(umask)
        monkeypatch.undo()
    secrets = [keys / "server.key_secret", keys / "clients/alice.smith.key_secret"]
    assert created == {str(path): 0o600 for path in secrets}
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        public, secret = zmq.auth.load_certificate(path)       # zmq.auth's own format
        assert secret and public == zmq.auth.load_certificate(path.with_suffix(".key"))[0]
    assert (keys / "authorized_clients/alice.smith.key").read_bytes() == (keys / "clients/alice.smith.key").read_bytes()

    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    for name in ("../../mallory", "a/b", "..", ".hidden", "", "x" * 65, "c:mallory", "new\nline"):
        assert backend_main(["keys", "generate", "--dir", str(keys), "--client", name]) == 2, name
        assert "a plain name" in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before                  # nothing written anywhere


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """One CPU worker, jobs killed after 4 s."""
    server = BackendProcess(tmp_path_factory.mktemp("one_worker") / "serve.log", "--job-timeout", "4",
                            workers=1).start()
    yield server
    assert server.stop() == 0, server.log()


def wait_for_worker(server: BackendProcess, accept, timeout_s: float = 60.0) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        worker = server.status().workers[0]
        if accept(worker):
            return worker
        time.sleep(0.03)
    raise AssertionError(f"worker never matched: {worker}")


def test_status_shows_a_client_only_its_own_job_ids(one_worker, grace_hopper_bytes):
    wait_for_worker(one_worker, lambda w: w["state"] == "idle")
    with Client(one_worker.address) as owner, Client(one_worker.address) as other:
        job = accepted_job(owner, owner.submit(grace_hopper_bytes, "mine.jpg", SLOW))
        wait_for_worker(one_worker, lambda w: w["state"] == "busy")
        seen_by_owner, seen_by_other = owner.status().workers[0], other.status().workers[0]
        print(f"status of another client's running job: {seen_by_other}")
        assert seen_by_owner["job_id"] == job
        assert seen_by_other["state"] == "busy" and seen_by_other["job_id"] is None
        owner.cancel(job)
        wait_for(owner, lambda m: isinstance(m, (Error, Result)) and m.job_id == job, 30)


def test_a_job_over_the_job_timeout_is_reported_as_such(one_worker, grace_hopper_bytes):
    wait_for_worker(one_worker, lambda w: w["state"] == "idle")
    with Client(one_worker.address) as client:
        job = accepted_job(client, client.submit(grace_hopper_bytes, "endless.jpg", SLOW))
        failure = wait_for(client, lambda m: isinstance(m, (Error, Result)) and m.job_id == job, 30)
    print(f"job over --job-timeout: {failure}")
    assert isinstance(failure, Error) and failure.code == ErrorCode.WORKER_FAILED
    assert "--job-timeout" in failure.message and "4 s" in failure.message
    assert "out of memory" not in failure.message and "signal" not in failure.message


def test_a_worker_killed_again_and_again_restarts_at_once(one_worker):
    """The restart back-off is for workers that die while starting; one that got ready restarts at once."""
    for kill in range(3):
        worker = wait_for_worker(one_worker, lambda w: w["state"] == "idle")
        os.kill(worker["pid"], signal.SIGKILL)
        states: list[str] = []

        def replaced(w: dict, seen: list = states, old_pid: int = worker["pid"]) -> bool:
            seen.append(w["state"])
            return w["pid"] != old_pid

        restarted = wait_for_worker(one_worker, replaced, timeout_s=5)
        print(f"kill {kill + 1}: states seen {list(dict.fromkeys(states))}")
        assert "waiting_to_restart" not in states, f"kill {kill + 1}: the worker waited to restart"
        assert restarted["state"] in ("starting", "idle") and restarted["restarts"] == worker["restarts"] + 1


def test_restart_back_off_grows_only_while_a_worker_dies_before_it_is_ready():
    from backend_server.server.workers import WorkerHandle, WorkerState
    slot = WorkerHandle("w0", "cpu")
    delays = []
    for state in [WorkerState.STARTING] * 3 + [WorkerState.IDLE, WorkerState.STARTING, WorkerState.BUSY]:
        slot.state = state
        slot.schedule_restart(now=100.0)
        delays.append(slot.restart_at - 100.0)
    assert delays == [0.5, 1.0, 2.0, 0.0, 0.5, 0.0]
    assert slot.restarts == 6 and slot.state == WorkerState.WAITING_TO_RESTART


def test_a_server_killed_with_sigkill_leaves_no_folder_once_a_server_starts_again(tmp_path):
    tmp = tmp_path / "tmp"                              # the servers' temporary folder (TMPDIR)
    tmp.mkdir()
    server = BackendProcess(tmp_path / "serve.log", workers=1, env={"TMPDIR": str(tmp)}).start()
    [killed] = tmp.glob("facerecon-*")                  # its worker link's ipc socket is in there
    server.kill()
    assert killed.is_dir()
    alive = tmp / "facerecon-server-alive"              # a folder of a process that still runs
    alive.mkdir()
    (alive / "server.pid").write_text(f"{os.getpid()}\n")
    unknown = tmp / "facerecon-server-unknown"          # one that says nothing of its owner
    unknown.mkdir()
    server.start()
    try:
        left = sorted(p.name for p in tmp.iterdir())
        print(f"after the restart: {left}")
        assert not killed.exists(), "the killed server's folder is still there"
        assert alive.is_dir() and unknown.is_dir() and len(left) == 3     # and the new server's own
        assert "stale" in server.log()
    finally:
        assert server.stop() == 0, server.log()
    assert sorted(p.name for p in tmp.iterdir()) == ["facerecon-server-alive", "facerecon-server-unknown"]


def refusal_lines(server: BackendProcess) -> list[str]:
    return [line for line in server.log().splitlines() if "WARNING" in line and "refused" in line]


def test_refused_handshakes_are_logged_with_the_peer_address_and_rate_limited(tmp_path):
    from backend_server.cli.backend import main as backend_main
    from backend_server.server.handshakes import MAX_LINES
    from shared_protocol.client import load_curve_keys, read_server_public_key
    keys = tmp_path / "keys"
    assert backend_main(["keys", "generate", "--dir", str(keys)]) == 0
    assert backend_main(["keys", "generate", "--dir", str(keys), "--client", "alice"]) == 0
    server_key = read_server_public_key(str(keys / "server.key"))
    alice = {"server_public_key": server_key, "client_keys": load_curve_keys(keys / "clients/alice.key_secret")}
    server = BackendProcess(tmp_path / "serve.log", "--keys", str(keys), workers=1).start(client_kwargs=alice)
    try:
        for stranger in ({"server_public_key": server_key}, {}):     # an unknown key; no CURVE at all
            before = len(refusal_lines(server))
            with Client(server.address, **stranger) as client:
                client.send_ping()
                end = time.monotonic() + 10
                while len(refusal_lines(server)) == before and time.monotonic() < end:
                    time.sleep(0.05)
                time.sleep(0.3)                   # the line that came may be the previous client's
        lines = refusal_lines(server)
        print("\n".join(lines))
        # One line per refused connection: a client without keys may retry once before it gives up,
        # and the refused key's connection may end in a failed send too (a broken pipe). Which side
        # sees the keyless client's mechanism mismatch first varies: the server names it, or sees
        # the connection closed under it (a broken pipe).
        assert 2 <= len(lines) <= 4, lines
        assert "127.0.0.1" in lines[0] and "not authorised" in lines[0] and "authorized_clients" in lines[0]
        assert any("without CURVE keys" in line or "handshake failed" in line for line in lines[1:]), lines
        # A crowd of unknown keys: at most MAX_LINES lines a minute, the rest counted at shutdown.
        crowd = []
        for _ in range(2 * MAX_LINES):
            socket = zmq.Context.instance().socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.curve_serverkey = server_key
            socket.curve_publickey, socket.curve_secretkey = zmq.curve_keypair()
            socket.connect(server.address)
            crowd.append(socket)
        time.sleep(2)
        for socket in crowd:
            socket.close()
        refused = len(lines) + len(crowd)
    finally:
        assert server.stop() == 0, server.log()
    lines = refusal_lines(server)
    assert len(lines) == MAX_LINES + 1 and f"{refused - MAX_LINES} more refused handshake" in lines[-1], lines


def test_a_job_over_the_worker_memory_budget_is_refused_with_the_size_that_fits(tmp_path, grace_hopper_bytes):
    """One 8192² job took 8.7 GB in a worker, with no cap: now a server option bounds what a job
    may need (its texture size decides), and a job over it is refused at once, naming what fits."""
    server = BackendProcess(tmp_path / "serve.log", "--worker-memory-gb", "2", workers=1).start()
    try:
        with Client(server.address) as client:
            with pytest.raises(ProtocolError) as refused:
                client.reconstruct(grace_hopper_bytes, "big.jpg", ReconstructOptions(texture_size=8192), timeout_s=20)
            assert refused.value.code == ErrorCode.OVER_MEMORY_BUDGET
            assert "8192² texture needs about 4.8 GB" in refused.value.message
            assert "2.0 GB (--worker-memory-gb): ask for 2048² or less" in refused.value.message
            result = client.reconstruct(grace_hopper_bytes, "small.jpg", ReconstructOptions(texture_size=2048),
                                        timeout_s=120)
            assert any(f.name == "small.png" for f in result.files)
    finally:
        assert server.stop() == 0, server.log()
    done = subprocess.run([sys.executable, "-m", "backend_server.cli.backend", "serve", "--worker-memory-gb", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--worker-memory-gb must be positive" in done.stderr

"""A real `facerecon-backend serve` process on a free loopback port, for end-to-end tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from shared_protocol import Accepted, Error, Message, ProtocolError, Status
from shared_protocol.client import Client

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class BackendProcess:
    """Start with `start()`, stop with `stop()` (SIGTERM; returns the exit code) or `kill()` (SIGKILL,
    workers included); `start()` again serves the same address. Logs go to log_path (appended)."""

    def __init__(self, log_path: Path, *extra_args: str, workers: int = 2, env: dict | None = None) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.log_path = log_path
        self.args = [sys.executable, "-m", "backend_server.cli.backend", "serve", "--bind", self.address,
                     "--workers", str(workers), "--warm-texture-size", "256", *extra_args]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, client_kwargs: dict | None = None, timeout_s: float = 90.0) -> "BackendProcess":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=self.env)
        with Client(self.address, **(client_kwargs or {})) as client:
            try:
                client.wait_until_ready(timeout_s, keep_waiting=lambda: self.process.poll() is None)
                return self
            except ProtocolError:
                code = self.stop()
                raise RuntimeError(f"backend not ready (exit code {code}):\n{self.log()}") from None

    def status(self, **client_kwargs) -> Status:
        with Client(self.address, **client_kwargs) as client:
            return client.status()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        """The server process's resident memory (VmRSS, Linux), MiB; its workers not included."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS line")

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the server and its worker processes, as a crash of the machine's backend would."""
        workers = [w["pid"] for w in self.status().workers if w.get("pid")]
        self.process.kill()
        self.process.wait()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


def wait_for(client: Client, accept: Callable[[Message], bool], timeout_s: float = 60.0) -> Message:
    """The first message `accept` takes within timeout_s (others are read and skipped)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        message = client.poll(100)
        if message is not None and accept(message):
            return message
    raise AssertionError(f"no matching message within {timeout_s} s")


def accepted_job(client: Client, request_id: str, timeout_s: float = 60.0) -> str:
    """The job id the server gave request_id (fails on a refusal)."""
    message = wait_for(client, lambda m: isinstance(m, (Accepted, Error)) and m.request_id == request_id,
                       timeout_s)
    assert isinstance(message, Accepted), message
    return message.job_id

"""A real `facerecon-backend serve` process on a free loopback port, for end-to-end tests."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

from shared_protocol import ProtocolError, Status
from shared_protocol.client import Client

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class BackendProcess:
    """Start with `start()`, stop with `stop()` (SIGTERM; returns the exit code). Logs go to log_path."""

    def __init__(self, log_path: Path, *extra_args: str, workers: int = 2) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.log_path = log_path
        self.args = [sys.executable, "-m", "backend_server.cli.backend", "serve", "--bind", self.address,
                     "--workers", str(workers), "--warm-texture-size", "256", *extra_args]
        self.process: subprocess.Popen | None = None

    def start(self, client_kwargs: dict | None = None, timeout_s: float = 90.0) -> "BackendProcess":
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.args, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
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

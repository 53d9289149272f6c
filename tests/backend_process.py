"""A real `facerecon-backend serve` process on a free loopback port, for end-to-end tests."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
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
        end = time.monotonic() + timeout_s
        with Client(self.address, **(client_kwargs or {})) as client:
            while time.monotonic() < end:
                if self.process.poll() is not None:
                    raise RuntimeError(f"backend exited with {self.process.returncode}:\n{self.log()}")
                try:
                    if all(w["state"] == "idle" for w in client.status(timeout_s=1.0).workers):
                        return self
                except ProtocolError:
                    pass
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"backend not ready within {timeout_s} s:\n{self.log()}")

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

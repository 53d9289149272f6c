"""What the benchmark scripts share: a backend server process on a free loopback port, percentiles."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared_protocol import ProtocolError  # noqa: E402
from shared_protocol.client import Client  # noqa: E402


def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def start_backend(address: str, serve_args: list[str], log: Path | None = None,
                  timeout_s: float = 180.0) -> subprocess.Popen:
    """`facerecon-backend serve --bind address *serve_args`, returned once every worker is ready.
    Exits the benchmark with the log's tail if the server does not come up."""
    output = open(log, "wb") if log else subprocess.DEVNULL
    process = subprocess.Popen([sys.executable, "-m", "backend_server.cli.backend", "--log-level", "WARNING",
                                "serve", "--bind", address, *serve_args], cwd=ROOT, stdout=output,
                               stderr=subprocess.STDOUT)
    with Client(address) as client:
        try:
            client.wait_until_ready(timeout_s, keep_waiting=lambda: process.poll() is None)
            return process
        except ProtocolError:
            process.kill()
            tail = log.read_text(errors="replace")[-3000:] if log else "(no log kept)"
            raise SystemExit(f"backend {' '.join(serve_args)} did not start:\n{tail}") from None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

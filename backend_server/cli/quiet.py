"""Keep MediaPipe's and TensorFlow Lite's native log lines off the terminal, and nothing else.

MediaPipe's C++ (absl logging) and TensorFlow Lite write straight to file descriptor 2, from the
calling thread and from their own graph threads, in this process and in every worker process:

    W0000 00:00:1795543271.307656   30148 inference_feedback_manager.cc:114] Feedback manager ...
    I0000 00:00:1795543271.307656   30148 gl_context.cc:357] GL version: ...
    INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR

Environment variables (GLOG_minloglevel, TF_CPP_MIN_LOG_LEVEL) do not reach absl's default sink,
so `quiet_native_logs()` works at the descriptor: fd 2 becomes a pipe whose reader thread passes
every line on to the real stderr except those native INFO and WARNING lines. Worker processes
inherit the pipe as their fd 2, so theirs are filtered too. Python's own `sys.stderr` (progress
bars, messages, tracebacks) is pointed at the real stderr directly, so it is never delayed. Native
ERROR and FATAL lines (`E…`, `F…`) and everything else still come through.
"""
from __future__ import annotations

import io
import os
import re
import select
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

NATIVE_LINE = re.compile(
    rb"^(?:[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] "         # absl: W0000 00:00:<seconds> <thread> file.cc:N]
    rb"|INFO: (?:Created|Initialized) TensorFlow Lite"                # TensorFlow Lite's delegate banners
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called)")
PARTIAL_WAIT_S = 0.2                 # a line without its newline yet is passed on after this (at most 5 waits)


def is_native_log_line(line: bytes) -> bool:
    """Whether one line (bytes, with or without its newline) is native log noise."""
    return NATIVE_LINE.match(line) is not None


class _Pump(threading.Thread):
    """Reads the pipe that fd 2 now is; writes each line to `out_fd` unless it is native noise."""

    def __init__(self, read_fd: int, out_fd: int) -> None:
        super().__init__(name="native-log-filter", daemon=True)
        self.read_fd, self.out_fd = read_fd, out_fd

    def _write(self, data: bytes) -> None:
        while data:
            try:
                data = data[os.write(self.out_fd, data):]
            except InterruptedError:
                continue
            except OSError:              # the terminal went away: keep draining the pipe
                return

    def run(self) -> None:
        pending, line_state, waits = b"", "", 0       # line_state: "" at a line start, else "pass"/"drop"
        while True:
            try:
                ready = select.select([self.read_fd], [], [], PARTIAL_WAIT_S)[0]
                chunk = os.read(self.read_fd, 65536) if ready else None
            except InterruptedError:
                continue
            except OSError:
                return
            if chunk == b"":                          # every writer closed: the end
                if pending and (line_state == "pass" or (not line_state and not is_native_log_line(pending))):
                    self._write(pending)
                return
            if chunk is None:                         # nothing for a while: decide on a partial line
                waits += 1
                if pending and not line_state:
                    if is_native_log_line(pending):
                        line_state = "drop"
                    elif waits >= 5 or not _may_become_native(pending):
                        line_state = "pass"
                if pending and line_state:
                    if line_state == "pass":
                        self._write(pending)
                    pending = b""
                continue
            waits = 0
            pending += chunk
            out = []
            while (end := pending.find(b"\n")) >= 0:
                line, pending = pending[:end + 1], pending[end + 1:]
                keep = line_state == "pass" or (not line_state and not is_native_log_line(line))
                if keep:
                    out.append(line)
                line_state = ""
            if pending and line_state:                # the rest of a line already decided on
                if line_state == "pass":
                    out.append(pending)
                pending = b""
            if out:
                self._write(b"".join(out))


BANNERS = (b"INFO: Created TensorFlow Lite", b"INFO: Initialized TensorFlow Lite",
           b"WARNING: All log messages before absl::InitializeLog() is called")
ABSL_START = re.compile(rb"[IW](?:\d{1,4}(?: (?:[\d:.]+(?: +(?:\d+(?: [^ \]]*)?)?)?)?)?)?")


def _may_become_native(partial: bytes) -> bool:
    """A line start that more bytes could still turn into a native log line."""
    return any(banner.startswith(partial) for banner in BANNERS) or ABSL_START.fullmatch(partial) is not None


@contextmanager
def quiet_native_logs(enabled: bool = True) -> Iterator[None]:
    """While inside: native INFO/WARNING log lines written to fd 2 (by this process or a child
    started inside) are dropped; everything else reaches the real stderr. `enabled` False (the
    command's --verbose): nothing changes."""
    if not enabled:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    real = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    pump = _Pump(read_fd, real)
    pump.start()
    previous = sys.stderr
    direct = None
    if sys.stderr is sys.__stderr__ and sys.stderr is not None:      # not when a test captures it
        direct = io.TextIOWrapper(io.FileIO(os.dup(real), "w"), encoding=sys.stderr.encoding,
                                  errors="backslashreplace", line_buffering=True, write_through=True)
        sys.stderr = direct
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        sys.stderr = previous
        if direct is not None:
            direct.close()
        os.dup2(real, 2)                          # this process's end of the pipe closes here
        pump.join(timeout=2.0)                    # children still holding it: do not wait for them
        if not pump.is_alive():                   # else the pump keeps both (never a reused fd number)
            os.close(real)
            os.close(read_fd)

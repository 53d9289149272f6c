"""The server's private folder (mode 0700) for the worker link's ipc:// socket, and its clean-up.

A server removes its folder when it exits; one killed with SIGKILL cannot. So each folder holds
`server.pid` ("PID START": the process id and, on Linux, its start time in clock ticks, which
tells a reused pid apart), and a starting server removes the folders of this user whose server
is dead. A folder without a readable pid file (being created right now, or not ours) is left alone.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "facerecon-server-"
PID_FILE = "server.pid"

log = logging.getLogger("facerecon.server")


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); '' if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]          # fields after "(comm)" start at field 3


def is_running(pid: int, start: str) -> bool:
    """Whether the process that wrote a pid file (pid, and start time if recorded) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                                      # someone's process: not ours to judge
    return not start or process_start(pid) in ("", start)


def remove_stale(parent: Path) -> list[Path]:
    """Remove this user's server folders in parent whose server process is gone; returns them."""
    removed = []
    for folder in parent.glob(f"{PREFIX}*"):
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            pid_text, _, start = (folder / PID_FILE).read_text().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if not is_running(pid, start):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def make_run_dir() -> Path:
    """A new private folder for this server (after removing dead servers' folders)."""
    parent = Path(tempfile.gettempdir())
    removed = remove_stale(parent)
    if removed:
        log.info("removed %d stale folder(s) of servers that did not exit cleanly: %s", len(removed),
                 ", ".join(p.name for p in removed))
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))       # 0700: only this user
    (folder / PID_FILE).write_text(f"{os.getpid()} {process_start(os.getpid())}\n")
    return folder

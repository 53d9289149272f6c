"""One WARNING line per refused handshake on the client socket, naming the peer; rate-limited.

Two sources. The ZAP handler (auth.py) reports each CURVE key it refuses, with the peer's address
(`refused_key`, from its thread). ZeroMQ's socket monitor reports the other failed handshakes (a
client without CURVE keys at a server with them, a wrong server key, ...); their address is read
from the connection's socket when ZeroMQ accepted it, if it is still open then. At most MAX_LINES
lines per WINDOW_S: the rest are counted, and the count is logged when the window ends or at close.
"""
from __future__ import annotations

import logging
import os
import queue
import socket as stdlib_socket
import time
from collections import deque

import zmq
from zmq.utils.monitor import recv_monitor_message

MAX_LINES = 10
WINDOW_S = 60.0
EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)      # AUTH failures come from the ZAP handler itself

log = logging.getLogger("facerecon.server")


def _peer_of(fd: int) -> str | None:
    """The remote address of a socket ZeroMQ accepted, or None once it is closed (or not TCP)."""
    try:
        with stdlib_socket.socket(fileno=os.dup(fd)) as sock:
            host, port = sock.getpeername()[:2]
            return f"{host}:{port}"
    except (OSError, ValueError, TypeError):
        return None


def _describe(event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return ("it does not use this server's security mechanism (a client without CURVE keys at a server "
                "with them, or the other way round)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return "its CURVE handshake does not decrypt (does it use this server's public key, server.key?)"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"its handshake broke the protocol (ZeroMQ protocol error {value:#x})"
    return f"the handshake failed ({os.strerror(value) if 0 < value < 4096 else value})"


class RefusalLog:
    """Watches the client socket's handshakes; `drain()` logs what happened (the server's loop)."""

    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket
        self.monitor = socket.get_monitor_socket(EVENTS)
        self._refused_keys: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._peers: dict[int, str | None] = {}           # fd -> address, for open connections
        # Failures waiting for their DISCONNECTED events, oldest first: two connections' events can
        # interleave (a failure carries no fd), and a single slot lost the first one's line.
        self._failed: deque[str] = deque()
        self._window_start = time.monotonic()
        self._lines = 0
        self._suppressed = 0

    def refused_key(self, address: str, key: str) -> None:
        """The ZAP handler refused this CURVE public key (Z85) from address. Any thread."""
        self._refused_keys.put((address, key))

    def drain(self) -> None:
        """Log the refusals reported since the last call; never blocks."""
        while True:
            try:
                address, key = self._refused_keys.get_nowait()
            except queue.Empty:
                break
            self._warn(f"refused a client at {address or 'an unknown address'}: its CURVE key {key} is not "
                       "authorised (its public key is not in the keys folder's authorized_clients/)")
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            kind, value = int(event["event"]), int(event["value"])
            if kind == zmq.EVENT_ACCEPTED:
                self._peers[value] = _peer_of(value)
            elif kind == zmq.EVENT_DISCONNECTED:
                peer = self._peers.pop(value, None)
                if self._failed:
                    self._warn(f"refused a connection from {peer or 'an unknown address (closed before it was read)'}"
                               f": {self._failed.popleft()}")
            else:                                          # a failed handshake; its DISCONNECTED follows
                self._failed.append(_describe(kind, value))

    def close(self) -> None:
        self.drain()
        self._end_window()
        self.socket.disable_monitor()
        self.monitor.close(linger=0)

    def _warn(self, line: str) -> None:
        if time.monotonic() - self._window_start > WINDOW_S:
            self._end_window()
        if self._lines < MAX_LINES:
            self._lines += 1
            log.warning("%s", line)
        else:
            self._suppressed += 1

    def _end_window(self) -> None:
        if self._suppressed:
            log.warning("%d more refused handshake(s) in the last %.0f s were not logged (at most %d lines "
                        "a minute)", self._suppressed, time.monotonic() - self._window_start, MAX_LINES)
        self._window_start, self._lines, self._suppressed = time.monotonic(), 0, 0

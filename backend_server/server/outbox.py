"""What the server holds for a client that does not read: bounded, in order, no job's answer lost.

The client ROUTER socket keeps at most CLIENT_SNDHWM messages per client connection (ZMQ_SNDHWM is
per pipe, and counts messages whatever their size); with ROUTER_MANDATORY a send to a full pipe
raises EAGAIN instead of blocking. From then on that client's messages wait here, in order, until
its pipe takes them again (`flush()`, every turn of the server's loop). While more than
HOLD_BACK_BYTES wait for a client (a result, in practice) the router starts none of its queued
jobs, so what waits stays bounded: one Accepted per queued job (at most the client's share of the
queue), the answers of the jobs already running (at most one per worker), and at most
MAX_OPTIONAL_HELD_BYTES of progress, pongs, status and refusals, beyond which those are dropped
with a logged count. A burst of small messages to a client that reads (faster than ZeroMQ's I/O
thread ships them) passes through here without holding its jobs back.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import zmq

CLIENT_SNDHWM = 16                      # messages per client connection inside ZeroMQ
HOLD_BACK_BYTES = 1024 ** 2             # waiting for a client: its queued jobs wait too
MAX_OPTIONAL_HELD_BYTES = 4 * 1024 ** 2  # progress, pongs, status, refusals kept for a client

log = logging.getLogger("facerecon.server")


@dataclass
class _Held:
    messages: deque[tuple[list, int, bool]] = field(default_factory=deque)   # (frames, bytes, essential)
    bytes: int = 0
    optional_bytes: int = 0
    dropped: int = 0                    # optional messages dropped
    held_back: bool = False             # over HOLD_BACK_BYTES at some point (logged)


class Outboxes:
    """Sends to clients through a ROUTER_MANDATORY socket; holds what a full pipe cannot take."""

    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket
        self._held: dict[bytes, _Held] = {}

    def __bool__(self) -> bool:
        """True while anything waits for any client (the server's loop then retries soon)."""
        return bool(self._held)

    def holding_back(self) -> set[bytes]:
        """The clients whose queued jobs must wait: more than HOLD_BACK_BYTES wait for them."""
        return {client for client, held in self._held.items() if held.bytes > HOLD_BACK_BYTES}

    def send(self, client: bytes, frames: list, essential: bool) -> bool:
        """Send now, or hold the message behind what already waits for this client. An essential
        message (Accepted, a job's Result or final Error) is always kept; others may be dropped.
        Returns False when the client is gone (nothing is held for it then)."""
        held = self._held.get(client)
        if held is None:
            try:
                self.socket.send_multipart([client, *frames], flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                held = self._held[client] = _Held()
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                return False
        size = sum(len(frame) for frame in frames)
        if not essential and held.optional_bytes + size > MAX_OPTIONAL_HELD_BYTES:
            held.dropped += 1
            return True
        if not held.held_back and held.bytes + size > HOLD_BACK_BYTES:
            held.held_back = True
            log.warning("client %s is not reading: %.1f MiB of answers wait for it; its queued jobs are "
                        "held back until it reads", client.hex(), (held.bytes + size) / 2**20)
        held.messages.append((frames, size, essential))
        held.bytes += size
        held.optional_bytes += 0 if essential else size
        return True

    def flush(self) -> list[bytes]:
        """Send what waits, in order, as far as each client reads; returns the clients found gone."""
        gone = []
        for client, held in list(self._held.items()):
            try:
                while held.messages:
                    frames, size, essential = held.messages[0]
                    self.socket.send_multipart([client, *frames], flags=zmq.NOBLOCK, copy=False)
                    held.messages.popleft()
                    held.bytes -= size
                    held.optional_bytes -= 0 if essential else size
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                gone.append(client)
                continue
            self._end(client, "reads again: what waited for it is sent and its jobs resume")
        return gone

    def forget(self, client: bytes) -> None:
        """Drop what waits for a client that disconnected."""
        if client in self._held:
            self._end(client, f"is gone: {len(self._held[client].messages)} waiting message(s) dropped")

    def _end(self, client: bytes, what: str) -> None:
        held = self._held.pop(client)
        if held.dropped:
            log.warning("client %s %s; %d progress, pong, status or refusal message(s) to it were dropped "
                        "(over %d MiB waited)", client.hex(), what, held.dropped, MAX_OPTIONAL_HELD_BYTES >> 20)
        elif held.held_back or held.messages:
            log.info("client %s %s", client.hex(), what)

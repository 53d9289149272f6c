"""The bounded, fair job queue between the ROUTER socket and the workers.

Fairness: one FIFO per client, served round robin, so a client's batch of 500 photos
and another client's single photo interleave (the single photo waits for at most one job
of each other client). Bounds: a job count and a byte total (encoded photos) for the whole
queue, and a share of both for each client, so that one client's batch cannot fill the queue
and lock the others out. A request over any bound is refused with `busy` at once, never left
waiting.
"""
from __future__ import annotations

import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Container

from shared_protocol import ReconstructRequest


@dataclass
class Job:
    """One accepted request. `client` is the ROUTER identity of the client that sent it."""

    client: bytes
    request: ReconstructRequest
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    accepted_at: float = field(default_factory=time.monotonic)   # monotonic seconds
    started_at: float | None = None
    worker: str | None = None                                     # worker name while running

    @property
    def photo_bytes(self) -> int:
        return self.request.photo_bytes


class FairQueue:
    """Per-client FIFOs served round robin; at most `max_jobs` jobs and `max_bytes` photo bytes in
    all, and at most `client_share` (0 < share <= 1) of each for any one client."""

    def __init__(self, max_jobs: int, max_bytes: int, client_share: float = 1.0) -> None:
        if not 0.0 < client_share <= 1.0:
            raise ValueError(f"the client share must be in (0, 1], not {client_share}")
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.client_share = client_share
        self.max_client_jobs = max(1, int(max_jobs * client_share))
        self.max_client_bytes = int(max_bytes * client_share)
        self._by_client: OrderedDict[bytes, deque[Job]] = OrderedDict()
        self._client_bytes: dict[bytes, int] = {}
        self._jobs = 0
        self._bytes = 0

    def __len__(self) -> int:
        return self._jobs

    def queued_for(self, client: bytes) -> int:
        """How many of this client's jobs are queued."""
        return len(self._by_client.get(client, ()))

    def refusal(self, client: bytes, photo_bytes: int) -> str | None:
        """Why this client's request of this size cannot be queued now (naming the bound), or None."""
        own, own_bytes = self.queued_for(client), self._client_bytes.get(client, 0)
        if own >= self.max_client_jobs:
            return (f"this client already has {own} jobs queued, this client's share of the queue "
                    f"(--client-share {self.client_share:g} of --queue-size {self.max_jobs}); send more as "
                    "its results arrive")
        if own_bytes + photo_bytes > self.max_client_bytes:
            return (f"this client's queued photos would exceed this client's share of the queue's "
                    f"{self.max_bytes / 2**20:.0f} MiB (--client-share {self.client_share:g}: "
                    f"{self.max_client_bytes / 2**20:.0f} MiB); send more as its results arrive")
        if self._jobs >= self.max_jobs:
            return (f"the job queue is full ({self._jobs} of {self.max_jobs} jobs queued, --queue-size); "
                    "retry later")
        if self._bytes + photo_bytes > self.max_bytes:
            return (f"the job queue holds {self._bytes / 2**20:.0f} MiB of photos, the limit is "
                    f"{self.max_bytes / 2**20:.0f} MiB; retry later")
        return None

    def push(self, job: Job) -> int:
        """Queue a job (caller checked `refusal`); returns how many queued jobs run before it."""
        own = self._by_client.setdefault(job.client, deque())
        ahead_of_own = len(own)
        own.append(job)
        self._count([job], +1)
        others = sum(min(len(q), ahead_of_own + 1) for c, q in self._by_client.items() if c != job.client)
        return ahead_of_own + others

    def pop(self, skip: Container[bytes] = ()) -> Job | None:
        """The next job in round-robin order over clients not in `skip`, or None when there is none."""
        client = next((c for c in self._by_client if c not in skip), None)
        if client is None:
            return None
        own = self._by_client[client]
        job = own.popleft()
        if own:
            self._by_client.move_to_end(client)
        else:
            del self._by_client[client]
        self._count([job], -1)
        return job

    def remove(self, job_id: str, client: bytes) -> Job | None:
        """Take a queued job of this client out of the queue (cancel); None if not queued."""
        own = self._by_client.get(client)
        if own is None:
            return None
        for job in own:
            if job.job_id == job_id:
                own.remove(job)
                if not own:
                    del self._by_client[client]
                self._count([job], -1)
                return job
        return None

    def remove_client(self, client: bytes) -> list[Job]:
        """Take every queued job of this client out of the queue (the client disconnected)."""
        jobs = list(self._by_client.pop(client, ()))
        self._count(jobs, -1)
        return jobs

    def drain(self) -> list[Job]:
        """Every queued job, emptying the queue (shutdown)."""
        jobs = [job for own in self._by_client.values() for job in own]
        self._by_client.clear()
        self._count(jobs, -1)
        return jobs

    def _count(self, jobs: list[Job], sign: int) -> None:
        """Keep the job and byte totals that `refusal` checks in step with the FIFOs."""
        self._jobs += sign * len(jobs)
        for job in jobs:
            self._bytes += sign * job.photo_bytes
            held = self._client_bytes.get(job.client, 0) + sign * job.photo_bytes
            if held:
                self._client_bytes[job.client] = held
            else:
                self._client_bytes.pop(job.client, None)

"""The agent's store rate limits: one ``Limiter`` per kind of traffic, shared by every transfer
of the agent (all buckets, all jobs), used on the event loop and from the ranged GET's threads.

What is limited, and where (docs/configuration.md, "Rate limits"): downloaded bytes as each
chunk of a body arrives (1 MiB); uploaded bytes before each object or part is sent; store
requests as each starts. Peer copies and shared file system paths are not store traffic and
are never limited. The bucket and its fairness are ``hpcstage.core.ratelimit``'s.

Unlimited (the default: a store made outside an agent gets a ``Throttle()`` of its own) costs
one attribute test per chunk or request, behind a call that returns at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hpcstage.core.ratelimit import MAX_SLEEP, TokenBucket


class Limiter:
    """One token bucket, thread-safe, whose callers sleep until their reservation's turn: in
    steps of at most ``MAX_SLEEP``, asking the bucket again after each, so that a new rate
    (``set_rate``, a node's share changed) applies to those already waiting too."""

    def __init__(self, rate: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._bucket = TokenBucket.start(rate, clock())
        self.active = rate > 0  # read without the lock: a stale value only delays a change

    @property
    def rate(self) -> float:
        return self._bucket.rate

    def set_rate(self, rate: float) -> None:
        """Limit to ``rate`` per second from now on (0: no limit)."""
        with self._lock:
            self._bucket.set_rate(rate, self._clock())
            self.active = rate > 0

    def reserve(self, amount: float) -> float:
        """Take ``amount``; the seconds to wait before using it, at the rate of now."""
        with self._lock:
            return self._bucket.reserve(amount, self._clock())

    async def take(self, amount: float) -> None:
        """Wait (on the event loop) until ``amount`` may be used."""
        if not self.active:
            return
        wait, ticket = self._reserve(amount)
        while wait > 0:
            await asyncio.sleep(min(wait, MAX_SLEEP))
            wait = self._wait(ticket)

    def take_blocking(self, amount: float, stop: threading.Event | None = None) -> None:
        """Wait (in a worker thread) until ``amount`` may be used, or until ``stop`` is set."""
        if not self.active:
            return
        stop = stop or threading.Event()
        wait, ticket = self._reserve(amount)
        while wait > 0 and not stop.wait(min(wait, MAX_SLEEP)):
            wait = self._wait(ticket)

    def _reserve(self, amount: float) -> tuple[float, float]:
        """Take ``amount``: its wait and its ticket (its place in line)."""
        with self._lock:
            wait = self._bucket.reserve(amount, self._clock())
            return wait, self._bucket.granted

    def _wait(self, ticket: float) -> float:
        with self._lock:
            return self._bucket.wait(ticket, self._clock())


@dataclass
class Throttle:
    """An agent's three limits: bytes downloaded and uploaded per second, requests per second."""

    download: Limiter = field(default_factory=Limiter)
    upload: Limiter = field(default_factory=Limiter)
    requests: Limiter = field(default_factory=Limiter)

    def set_rates(self, download: float, upload: float, requests: float) -> None:
        """Apply new limits (0: none) to every transfer, those under way included."""
        self.download.set_rate(download)
        self.upload.set_rate(upload)
        self.requests.set_rate(requests)

"""Rate limits of an agent's store traffic: the token bucket, and a node's share of a site limit.

Pure: the bucket takes the time as an argument (tests drive it with a fake clock); sleeping is
the caller's (``hpcstage.store.throttle``).

The bucket hands out *reservations*: ``reserve(n, now)`` takes ``n`` tokens at once, letting
the count go below zero, and answers how long the caller must wait before it may use them
(the debt divided by the rate). So:

1. **A rate change reaches those already waiting.** Each reservation has a place in line
   (``granted`` after it: its *ticket*); ``wait(ticket, now)`` answers how long it still has
   to wait at the rate of *now*. A caller sleeps in steps of at most ``MAX_SLEEP`` and asks
   again, so a rate raised (or lowered) while it sleeps applies to it within a step.
2. **Fair, first come first served.** A reservation's wait counts the debt of every earlier
   one, so no caller can be overtaken indefinitely: concurrent transfers that take the bucket
   a chunk at a time (1 MiB for downloads) advance in turn, each at about rate / N.
3. **Burst.** A bucket left alone fills up to ``burst`` tokens (``burst_for``: one second of
   the rate), which pass at once; over any span of ``t`` seconds at most ``burst + rate * t``
   tokens are used. A reservation larger than the burst is granted too (it waits for its
   debt): a big request is slowed, never refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

BURST_SECONDS: Final = 1.0  # a bucket's burst: this many seconds of its rate
MAX_SLEEP: Final = 1.0  # seconds a waiter sleeps before it asks the bucket again

# The least share of a site limit a node is given, however many nodes transfer: below it a
# node's transfers would wait minutes per request or chunk (10 requests/s over 1000 nodes is
# one request every 100 s). The site total may then exceed the limit, by at most
# floor x N (docs/configuration.md, "Rate limits").
REQUEST_FLOOR: Final = 1.0  # requests per second
BYTES_FLOOR: Final = 2**20  # bytes per second: one download chunk a second


def burst_for(rate: float) -> float:
    """The tokens a full bucket of ``rate`` holds: one second's worth, at least one token."""
    return max(rate * BURST_SECONDS, 1.0)


@dataclass
class TokenBucket:
    """Tokens (bytes or requests) refilled at ``rate`` per second up to ``burst``; a rate of
    0 is no limit. Starts full."""

    rate: float = 0.0
    burst: float = 0.0
    tokens: float = 0.0
    stamp: float = 0.0  # when ``tokens`` was last brought up to date
    granted: float = 0.0  # tokens reserved so far: a reservation's ticket is this after it

    @classmethod
    def start(cls, rate: float, now: float) -> TokenBucket:
        """A full bucket of ``rate`` at time ``now``."""
        burst = burst_for(rate) if rate > 0 else 0.0
        return cls(rate, burst, burst, now)

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def reserve(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens; the seconds from ``now`` the caller must wait to use them."""
        if self.unlimited:
            return 0.0
        self._refill(now)
        self.tokens -= amount
        self.granted += amount
        return self.wait(self.granted, now)

    def wait(self, ticket: float, now: float) -> float:
        """The seconds from ``now`` until the reservation holding ``ticket`` may be used, at
        the rate as it is now. Its debt is the bucket's less what later reservations owe."""
        if self.unlimited:
            return 0.0
        self._refill(now)
        owed = -self.tokens - (self.granted - ticket)
        return max(owed, 0.0) / self.rate

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate from ``now`` on: tokens earned so far count at the old rate, and a
        smaller burst caps what is saved up (a debt stays: it was granted already)."""
        if rate == self.rate:
            return
        was_unlimited = self.unlimited
        self._refill(now)
        self.rate = rate
        self.burst = burst_for(rate) if rate > 0 else 0.0
        # From no limit a bucket starts full, as a new one does; else what was saved up stays,
        # within the new burst.
        self.tokens = self.burst if was_unlimited else min(self.tokens, self.burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now


def node_share(
    node_limit: float, site_limit: float, nodes_transferring: int, floor: float = 0.0
) -> float:
    """What one node may use of a rate: its own limit, and its equal share of the site's
    among the nodes transferring now (itself included), never below ``floor`` (nor above the
    site's limit); 0 = unlimited (both are 0)."""
    share = site_limit / max(nodes_transferring, 1) if site_limit > 0 else 0.0
    if share > 0:
        share = max(share, min(floor, site_limit))
    if node_limit <= 0:
        return share
    return min(node_limit, share) if share > 0 else node_limit

"""Rate limits of an agent's store traffic: the token bucket, and a node's share of a site limit.

Pure: the bucket takes the time as an argument (tests drive it with a fake clock); sleeping is
the caller's (``hpcstage.store.throttle``).

The bucket hands out *reservations*: ``reserve(n, now)`` takes ``n`` tokens at once, letting
the count go below zero, and answers how long the caller must wait before it may use them
(the debt divided by the rate). So:

1. **No busy-wait.** A caller sleeps once, for exactly its wait; nobody polls.
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
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

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


def node_share(node_limit: float, site_limit: float, nodes_transferring: int) -> float:
    """What one node may use of a rate: its own limit, and its equal share of the site's
    among the nodes transferring now (itself included); 0 = unlimited (both are 0)."""
    share = site_limit / max(nodes_transferring, 1) if site_limit > 0 else 0.0
    if node_limit <= 0:
        return share
    return min(node_limit, share) if share > 0 else node_limit

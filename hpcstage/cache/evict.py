"""Eviction policy for a node cache, as a pure function over a snapshot of its entries.

Two passes, in order:

1. TTL: every unleased entry not accessed for ``ttl`` seconds goes, whatever the fill level
   (stale datasets should not pin disk until the next pressure spike).
2. Watermarks: if what remains exceeds ``high * capacity``, unleased entries go in LRU order
   until it is at most ``low * capacity``. Evicting down to a lower mark than the trigger avoids
   running eviction again after every single fetch. With ``max_objects`` the number of
   entries has the same two marks (each entry is a file, hence an inode: 10^7 zero-byte
   objects never reach a byte mark but exhaust the file system); whichever count is over its
   high mark is brought down to its low mark. A packed tree is one entry whose count is its
   inodes (files and directories).

Leased entries (linked into a job's view) are never chosen, even if that leaves the cache above
its high watermark: a job's inputs matter more than the fill level.

``EvictionPass`` applies the policy to a stream of entries (what a node cache with millions of
objects does); ``choose_evictions`` applies it to a list (tests, small callers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """What eviction needs to know about one cached object."""

    cache_id: str
    size: int
    last_access: float
    leased: bool
    inodes: int = 1  # a packed tree counts its files and directories


class EvictionPass:
    """The policy applied one entry at a time, in LRU order, without holding a snapshot.

    A node cache with 10^6 objects streams its index through ``offer()`` a page at a time;
    ``total`` is the indexed bytes (leased included) when the pass starts. Entries must come
    oldest access first (ties by id): then every expired entry comes before every fresh one,
    and the result equals the two passes described in the module docstring.
    """

    def __init__(
        self,
        total: int,
        capacity: int,
        high: float,
        low: float,
        ttl: float,
        now: float,
        *,
        count: int = 0,
        max_objects: int = 0,
    ) -> None:
        """``capacity`` in bytes; ``high``/``low`` fractions of it (and of ``max_objects``,
        0 = no limit on ``count``, the indexed entries); ``ttl`` in seconds."""
        _check_policy(capacity, high, low, ttl)
        self.total = total
        self.count = count
        self.cutoff = now - ttl
        self._high = high * capacity
        self._low = low * capacity
        self._high_count = high * max_objects if max_objects else math.inf
        self._low_count = low * max_objects if max_objects else math.inf
        self._over: tuple[bool, bool] | None = None  # (bytes, count), at the first fresh one
        self.done = False

    def needed(self, oldest_access: float | None) -> bool:
        """False when no entry can be chosen (below the high marks and nothing expired)."""
        expired = oldest_access is not None and oldest_access < self.cutoff
        return expired or self.total > self._high or self.count > self._high_count

    def offer(self, entry: Entry) -> bool:
        """True if ``entry`` is to be evicted (the caller must then evict it)."""
        if self.done or entry.leased:
            return False
        if entry.last_access < self.cutoff:
            self._take(entry.size, entry.inodes)
            return True
        if self._over is None:
            self._over = (self.total > self._high, self.count > self._high_count)
        over_bytes, over_count = self._over
        if not (over_bytes and self.total > self._low) and not (
            over_count and self.count > self._low_count
        ):
            self.done = True  # fresh entries come in LRU order: nothing later qualifies
            return False
        self._take(entry.size, entry.inodes)
        return True

    def forget(self, size: int) -> None:
        """An indexed entry vanished (its file was gone): it no longer counts."""
        self._take(size)

    def _take(self, size: int, inodes: int = 1) -> None:
        self.total -= size
        self.count -= inodes


def choose_evictions(
    entries: Sequence[Entry],
    capacity: int,
    high: float,
    low: float,
    ttl: float,
    now: float,
    max_objects: int = 0,
) -> list[str]:
    """Return the cache_ids to evict, expired ones first, then least recently used.

    ``capacity`` is in bytes; ``high`` and ``low`` are fractions of it (and of ``max_objects``,
    0 = entries not counted) with ``0 <= low <= high``; ``ttl`` is in seconds (``math.inf``
    disables the TTL pass); ``now`` is a Unix time.
    """
    total = sum(e.size for e in entries)
    count = sum(e.inodes for e in entries)
    policy = EvictionPass(
        total, capacity, high, low, ttl, now, count=count, max_objects=max_objects
    )
    chosen = []
    for entry in sorted(entries, key=_lru_key):
        if policy.offer(entry):
            chosen.append(entry.cache_id)
        elif policy.done:
            break
    return chosen


def _lru_key(entry: Entry) -> tuple[float, str]:
    # Ties broken by id so the same snapshot always yields the same plan.
    return (entry.last_access, entry.cache_id)


def _check_policy(capacity: int, high: float, low: float, ttl: float) -> None:
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, not {capacity}")
    if not 0 <= low <= high:
        raise ValueError(f"watermarks need 0 <= low <= high, not low={low} high={high}")
    if ttl < 0:
        raise ValueError(f"ttl must be >= 0, not {ttl}")

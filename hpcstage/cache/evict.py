"""Eviction policy for a node cache, as a pure function over a snapshot of its entries.

Two passes, in order:

1. TTL: every unleased entry not accessed for ``ttl`` seconds goes, whatever the fill level
   (stale datasets should not pin disk until the next pressure spike).
2. Watermarks: if what remains exceeds ``high * capacity``, unleased entries go in LRU order
   until it is at most ``low * capacity``. Evicting down to a lower mark than the trigger avoids
   running eviction again after every single fetch.

Leased entries (linked into a job's view) are never chosen, even if that leaves the cache above
its high watermark: a job's inputs matter more than the fill level. Per-account quotas, when
they come, are one more pass over the same entries (with an account field) before the watermarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """What eviction needs to know about one cached object."""

    cache_id: str
    size: int
    last_access: float
    leased: bool


def choose_evictions(
    entries: Sequence[Entry],
    capacity: int,
    high: float,
    low: float,
    ttl: float,
    now: float,
) -> list[str]:
    """Return the cache_ids to evict, expired ones first, then least recently used.

    ``capacity`` is in bytes; ``high`` and ``low`` are fractions of it with ``0 <= low <= high``;
    ``ttl`` is in seconds (``math.inf`` disables the TTL pass); ``now`` is a Unix time.
    """
    _check_policy(capacity, high, low, ttl)
    candidates = sorted((e for e in entries if not e.leased), key=_lru_key)
    cutoff = now - ttl
    expired = [e for e in candidates if e.last_access < cutoff]
    fresh = [e for e in candidates if e.last_access >= cutoff]
    chosen = [e.cache_id for e in expired]
    total = sum(e.size for e in entries) - sum(e.size for e in expired)
    if total <= high * capacity:
        return chosen
    for entry in fresh:
        if total <= low * capacity:
            break
        chosen.append(entry.cache_id)
        total -= entry.size
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

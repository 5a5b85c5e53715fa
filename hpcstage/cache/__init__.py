"""The node cache: objects keyed by source identity, per-job hardlink views, leases, eviction.

``NodeCache`` is the effectful shell (files, SQLite); ``choose_evictions`` is the pure policy.
"""

from hpcstage.cache.evict import Entry, choose_evictions
from hpcstage.cache.layout import CacheError
from hpcstage.cache.store import (
    CacheStats,
    Fetch,
    NodeCache,
    PendingObject,
    ReconcileReport,
    Usage,
)

__all__ = [
    "CacheError",
    "CacheStats",
    "Entry",
    "Fetch",
    "NodeCache",
    "PendingObject",
    "ReconcileReport",
    "Usage",
    "choose_evictions",
]

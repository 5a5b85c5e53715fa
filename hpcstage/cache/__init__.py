"""The node cache: objects keyed by source identity, per-job hardlink views, leases, eviction.

``NodeCache`` is the effectful shell (files, SQLite); ``choose_evictions`` is the pure policy.
"""

from hpcstage.cache.commit import PendingObject
from hpcstage.cache.evict import Entry, choose_evictions
from hpcstage.cache.node import CacheStats, Dropped, Fetch, NodeCache, Usage
from hpcstage.cache.reconcile import ReconcileReport
from hpcstage.cache.views import check_dest, key_dest

__all__ = [
    "CacheStats",
    "Dropped",
    "Entry",
    "Fetch",
    "NodeCache",
    "PendingObject",
    "ReconcileReport",
    "Usage",
    "check_dest",
    "choose_evictions",
    "key_dest",
]

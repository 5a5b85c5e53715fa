"""What the agent's call handlers share: the node cache and the store clients.

Handlers take a ``NodeContext``, not the server that dispatches to them, so that no module of
the agent needs the one that routes calls (no import circle).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpcstage.cache import NodeCache
from hpcstage.cache.fence import EpochFence
from hpcstage.errors import HpcstageError
from hpcstage.protocol.messages import (
    AgentCacheSettings,
    AgentStoreSettings,
    AgentTransferSettings,
    RateLimits,
)
from hpcstage.retry import DEFAULT_RETRY, RetryPolicy
from hpcstage.store.fs import FsStore
from hpcstage.store.protocol import ObjectStore
from hpcstage.store.s3 import S3Store
from hpcstage.store.throttle import Throttle

# Until the daemon's hello says otherwise (its [transfer] defaults).
DEFAULT_TRANSFER = AgentTransferSettings(
    concurrency=64,
    part_size=64 * 1024 * 1024,
    multipart_threshold=256 * 1024 * 1024,
    retries=DEFAULT_RETRY.retries,  # the site's [transfer] defaults are these too
    backoff_base=DEFAULT_RETRY.base,
    backoff_max=DEFAULT_RETRY.cap,
    lean_get=True,
    direct_writes=True,
)
DEFAULT_CACHE = AgentCacheSettings(durable_before_read=False)  # the site's [cache] default


@dataclass
class Tally:
    """Store requests the agent's clients retried, and lean GETs they handed back to the SDK,
    since the agent started (for the daemon's /metrics: docs/metrics.md)."""

    retries: int = 0
    closed_fallbacks: int = 0  # of the clients closed since (their own counters go with them)
    since: float = field(default_factory=time.time)

    def retried(self, _retry: int, _delay: float, _error: Exception) -> None:
        """``hpcstage.retry``'s ``on_retry``: one more retry (called on the event loop)."""
        self.retries += 1


def fallbacks(store: S3Store) -> int:
    """Lean GETs (whole objects and big objects' parts) ``store`` handed back to the SDK."""
    return sum(s.fell_back for s in (store.lean_stats, store.ranged_stats) if s is not None)


@dataclass
class Stores:
    """The agent's store clients, made from the settings of the daemon's last hello."""

    settings: AgentStoreSettings | None = None
    transfer: AgentTransferSettings = DEFAULT_TRANSFER
    # Start writing downloads to disk as they land (sync_file_range): a head start for the
    # flush that comes before readers only when the cache is durable before read.
    writeback_hints: bool = False
    _open: dict[str, ObjectStore] = field(default_factory=dict)
    _retired: list[S3Store] = field(default_factory=list)  # clients of superseded credentials
    tally: Tally = field(default_factory=Tally)
    # The rate limits every S3 client of the agent shares; the daemon sets them with each
    # stage call (and between, as other nodes start or stop transferring: ``rates``).
    throttle: Throttle = field(default_factory=Throttle)
    rates_generation: int = 0  # of the limits applied last (``RateLimits.generation``)

    @property
    def retry(self) -> RetryPolicy:
        t = self.transfer
        return RetryPolicy(retries=t.retries, base=t.backoff_base, cap=t.backoff_max)

    async def configure(
        self, settings: AgentStoreSettings, transfer: AgentTransferSettings
    ) -> None:
        """Take new settings: every client is closed, new ones are made on demand."""
        self.settings, self.transfer = settings, transfer
        self.rates_generation = 0  # a new daemon session counts its rate limits from 1 again
        await self.close()

    def set_rates(self, limits: RateLimits) -> None:
        """Limit the agent's store traffic to ``limits`` from now on, transfers under way
        included (every stage call carries them; ``rates`` calls change them between).
        Limits older than those applied last are ignored: the daemon has changed them since."""
        if limits.generation < self.rates_generation:
            return
        self.rates_generation = limits.generation
        self.throttle.set_rates(limits.download, limits.upload, limits.requests)

    def files(self, root: str) -> FsStore:
        """The store of a shared file system directory."""
        found = self._open.get(f"file:{root}")
        if found is None:
            found = FsStore(Path(root), retry=self.retry, on_retry=self.tally.retried)
            self._open[f"file:{root}"] = found
        assert isinstance(found, FsStore)
        return found

    def s3(self, bucket: str) -> S3Store:
        """The (shared, pooled) client for one bucket of the site's store."""
        if bucket not in self._open:
            self._open[bucket] = self._new_s3(bucket)
        found = self._open[bucket]
        assert isinstance(found, S3Store)
        return found

    def _new_s3(self, bucket: str) -> S3Store:
        s, t = self._settings(), self.transfer
        return S3Store(
            s.endpoint_url,
            bucket,
            region=s.region,
            profile=None,
            addressing_style=s.addressing_style,
            verify_tls=s.verify_tls,
            ca_bundle=s.ca_bundle or None,
            max_connections=max(s.max_connections, t.concurrency),
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            part_size=t.part_size,
            multipart_threshold=t.multipart_threshold,
            retry=self.retry,
            on_retry=self.tally.retried,
            credentials=s.credentials,
            lean_get=t.lean_get,
            direct_writes=t.direct_writes,
            writeback_hints=self.writeback_hints,
            throttle=self.throttle,
        )

    async def renew_credentials(self, credentials: dict[str, str]) -> int:
        """Sign new transfers with ``credentials``; transfers under way keep their clients
        (the old keys stay valid a while yet), closed when the next keys arrive. The number
        of clients set aside."""
        self._settings().credentials = dict(credentials)
        for store in self._retired:
            await self._close(store)
        self._retired = [s for s in self._open.values() if isinstance(s, S3Store)]
        self._open = {k: s for k, s in self._open.items() if not isinstance(s, S3Store)}
        return len(self._retired)

    async def close(self) -> None:
        """Close every client."""
        for store in [*self._open.values(), *self._retired]:
            await self._close(store)
        self._open.clear()
        self._retired.clear()

    def fallbacks(self) -> int:
        """Lean GETs handed back to the SDK since the agent started."""
        clients = [s for s in [*self._open.values(), *self._retired] if isinstance(s, S3Store)]
        return self.tally.closed_fallbacks + sum(fallbacks(s) for s in clients)

    async def _close(self, store: ObjectStore) -> None:
        if isinstance(store, S3Store):
            self.tally.closed_fallbacks += fallbacks(store)
        await store.close()

    def _settings(self) -> AgentStoreSettings:
        if self.settings is None:
            raise HpcstageError("agent has no store settings (no hello from the daemon)")
        return self.settings


@dataclass
class NodeContext:
    """One node's cache and the stores it fetches from and uploads to."""

    node: str
    cache: NodeCache
    stores: Stores = field(default_factory=Stores)
    pid: int = field(default_factory=os.getpid)
    # The leader epoch this agent serves (``--epoch``); None: started by hand, not fenced.
    fence: EpochFence | None = None
    evicting_source: bool = False  # a ``drop_source`` runs (one at a time)

    @property
    def concurrency(self) -> int:
        """Transfers at once, as the daemon's hello set it."""
        return self.stores.transfer.concurrency

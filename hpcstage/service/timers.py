"""The daemon's periodic chores, run after each tick: each does its work only when due.

Eviction by policy on the nodes' caches (every ``EVICT_EVERY`` s), recycle-bin expiry (every
``TRASH_EXPIRY_EVERY`` s), and handing agents new S3 credentials when botocore refreshed them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from hpcstage.errors import CredentialError, HpcstageError
from hpcstage.protocol.messages import CredentialsRequest
from hpcstage.staging.access import StoreAccess
from hpcstage.staging.agents import AgentClient
from hpcstage.staging.bins import RecycleBins
from hpcstage.staging.caches import NodeCaches
from hpcstage.staging.nodes import NodeAgents
from hpcstage.store.credentials import CredentialSource

log = logging.getLogger("hpcstage.daemon")  # the daemon's log: the name sites filter on

TRASH_EXPIRY_EVERY = 3600.0  # seconds between recycle-bin sweeps
EVICT_EVERY = 30.0  # seconds between eviction passes on the nodes' caches


@dataclass
class Timers:
    """Runs the periodic chores that are due."""

    db: sessionmaker[Session]
    nodes: NodeAgents
    caches: NodeCaches
    bins: RecycleBins
    access: StoreAccess
    creds: CredentialSource
    _last_expiry: float = 0.0
    _last_eviction: float = 0.0

    async def run_due(self) -> None:
        """Each chore whose time has come."""
        await self.renew_credentials()
        await self.maybe_evict()
        await self.maybe_expire()

    async def renew_credentials(self) -> None:
        """Hand agents the store credentials anew when botocore has refreshed them (temporary
        ones are refreshed within 15 minutes of their expiry; long-term ones never change)."""
        try:
            fresh = await asyncio.to_thread(self.creds.current)
        except CredentialError as exc:
            log.error("%s (staging goes on with the current ones until they expire)", exc)
            return
        if fresh == self.access.credentials:
            return
        self.access.credentials = fresh
        await self.bins.stores.renew()
        told = 0
        for node in self.nodes.open_nodes():
            try:
                rpc = await self.nodes.pool.get(node)
                renewed = CredentialsRequest(dict(fresh))
                await asyncio.wait_for(AgentClient(rpc, node).credentials(renewed), 30)
                told += 1
            except (HpcstageError, TimeoutError) as exc:  # it gets them in its next hello
                log.warning("agent on %s: new S3 credentials not handed over: %s", node, exc)
        log.info("S3 credentials renewed; handed to %d agent(s)", told)

    async def maybe_evict(self) -> None:
        """Apply the eviction policy on every open node, every ``EVICT_EVERY`` seconds."""
        if time.time() - self._last_eviction < EVICT_EVERY:
            return
        self._last_eviction = time.time()
        for node, reply in (await self.caches.evict_all()).items():
            if reply["evicted"]:
                log.info("cache on %s: %d objects evicted by policy", node, reply["evicted"])

    async def maybe_expire(self) -> None:
        """Empty the recycle bins of expired entries, every ``TRASH_EXPIRY_EVERY`` seconds."""
        if time.time() - self._last_expiry < TRASH_EXPIRY_EVERY:
            return
        self._last_expiry = time.time()
        deleted = await self.bins.expire(self.db)
        if deleted:
            log.info("recycle bin: %d expired objects deleted", deleted)

"""The nodes' caches as the daemon sees them: what one holds, and eviction by policy."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from hpcstage.config.schema import Settings
from hpcstage.errors import AgentError, TransportError
from hpcstage.protocol.messages import EvictRequest
from hpcstage.staging.agents import AgentClient
from hpcstage.staging.meters import Meters
from hpcstage.staging.nodes import NodeAgents

log = logging.getLogger("hpcstage.daemon")  # the daemon's log: the name sites filter on


@dataclass
class NodeCaches:
    """Asks node agents about their caches and has them evict by the site's policy."""

    settings: Settings
    nodes: NodeAgents
    meters: Meters | None = None  # gets what each pass leaves in the cache

    async def usage(self, node: str) -> dict[str, Any]:
        """What the node's cache holds (bytes, objects, leased) and its job directories."""
        rpc = await self.nodes.agent(node)
        reply = await asyncio.wait_for(AgentClient(rpc, node).usage(), 30)
        return {**dataclasses.asdict(reply), "capacity": self.settings.cache.max_bytes}

    async def evict_node(self, node: str) -> int:
        """Apply the eviction policy on ``node`` now (opening its agent session if needed);
        the number of objects evicted. Leased objects stay."""
        c = self.settings.cache
        policy = EvictRequest(
            max_bytes=c.max_bytes,
            high=c.high_watermark,
            low=c.low_watermark,
            ttl=c.ttl,
            max_objects=c.max_objects,
        )
        reply = await AgentClient(await self.nodes.agent(node), node).evict(policy)
        if self.meters is not None:
            self.meters.cache_held(node, reply.bytes, reply.objects)
            self.meters.agent_reported(node, reply.since, reply.retries, reply.fallbacks)
        return reply.evicted

    async def evict_all(self) -> dict[str, dict[str, int]]:
        """Apply the eviction policy on every node with an open agent session, all at once."""

        async def one(node: str) -> tuple[str, int | None]:
            try:
                return node, await self.evict_node(node)
            except (AgentError, TransportError) as exc:
                log.warning("eviction on %s failed: %s", node, exc)
                return node, None

        done = await asyncio.gather(*(one(node) for node in self.nodes.open_nodes()))
        return {node: {"evicted": count} for node, count in done if count is not None}

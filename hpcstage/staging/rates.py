"""Each node's store rate limits: its own ``[transfer]`` limits and its share of the site's.

The daemon is not in the data path, so a site limit is enforced by dividing it: every node
with a stage or stage-out call in flight gets ``site limit / N`` (N: such nodes now), with
each call (``RateLimits`` in the request), and when N changes the other nodes are told their
new share at once (the ``rates`` call). The trade-offs (docs/configuration.md, "Rate limits"):
a node that has little left to move keeps its equal share, unused, until its call ends; and
for the moment between a node starting and the others hearing of it (one message each),
the site total may exceed its limit by one share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hpcstage.config.schema import TransferSettings
from hpcstage.core.ratelimit import BYTES_FLOOR, REQUEST_FLOOR, node_share
from hpcstage.errors import HpcstageError
from hpcstage.protocol.messages import NO_LIMITS, RateLimits
from hpcstage.staging.agents import AgentClient
from hpcstage.staging.nodes import NodePool

log = logging.getLogger("hpcstage.daemon")


def transferring(
    shares: RateShares | None, node: str
) -> contextlib.AbstractAsyncContextManager[RateLimits]:
    """``shares.transferring(node)``, or no limits when there are no shares (tests)."""
    return contextlib.nullcontext(NO_LIMITS) if shares is None else shares.transferring(node)


def node_rates(settings: TransferSettings, nodes_transferring: int) -> RateLimits:
    """One node's limits while ``nodes_transferring`` nodes (itself included) transfer."""
    s, n = settings, nodes_transferring
    return RateLimits(
        download=_whole(node_share(s.node_download_rate, s.site_download_rate, n, BYTES_FLOOR)),
        upload=_whole(node_share(s.node_upload_rate, s.site_upload_rate, n, BYTES_FLOOR)),
        requests=node_share(s.node_request_rate, s.site_request_rate, n, REQUEST_FLOOR),
    )


def _whole(bytes_per_second: float) -> int:
    """Bytes per second on the wire: at least 1 where there is a limit (0 is none)."""
    return max(int(bytes_per_second), 1) if bytes_per_second > 0 else 0


@dataclass
class RateShares:
    """Which nodes transfer now, and the limits each is told."""

    settings: TransferSettings
    nodes: NodePool
    _calls: dict[str, int] = field(default_factory=dict)  # node -> stage calls in flight
    _told: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def _site_limited(self) -> bool:
        s = self.settings
        return bool(s.site_download_rate or s.site_upload_rate or s.site_request_rate)

    def current(self) -> RateLimits:
        """A transferring node's limits now."""
        return node_rates(self.settings, len(self._calls))

    @contextlib.asynccontextmanager
    async def transferring(self, node: str) -> AsyncIterator[RateLimits]:
        """Count ``node`` as transferring for the block; yields the limits its call carries."""
        self._calls[node] = self._calls.get(node, 0) + 1
        if self._calls[node] == 1:
            self._rebalance(skip=node)
        try:
            yield self.current()
        finally:
            self._calls[node] -= 1
            if not self._calls[node]:
                del self._calls[node]
                self._rebalance(skip=node)

    def _rebalance(self, skip: str) -> None:
        """Tell every other transferring node its new share (only site limits change it)."""
        if not self._site_limited:
            return
        for node in self._calls:
            if node != skip:
                task = asyncio.create_task(self._tell(node))
                self._told.add(task)
                task.add_done_callback(self._told.discard)

    async def _tell(self, node: str) -> None:
        try:
            rpc = await self.nodes.agent(node)
            if node in self._calls:  # the share as of now, not as of the change: tasks race
                await AgentClient(rpc, node).rates(self.current())
        except HpcstageError as exc:
            # Its stage call fails the same way and is retried: nothing to do here.
            log.debug("could not tell %s its store rate limits: %s", node, exc)

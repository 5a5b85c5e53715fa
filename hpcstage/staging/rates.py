"""Each node's store rate limits: its own ``[transfer]`` limits and its share of the site's.

The daemon is not in the data path, so a site limit is enforced by dividing it: every node
with a stage or stage-out call in flight gets ``site limit / N`` (N: such nodes now), with
each call (``RateLimits`` in the request), and when N changes the other nodes are told their
new share at once (the ``rates`` call). The trade-offs (docs/configuration.md, "Rate limits"):
a node that has little left to move keeps its equal share, unused, until its call ends; and
for the moment between a node starting and the others hearing of it (one message each),
the site total may exceed its limit by one share.

The messages are bounded: each node has at most one in flight, which sends the share as of
when it is sent (changes meanwhile are coalesced: the latest share wins), and each is given
up after ``TELL_TIMEOUT``. Every share carries a generation, so that an agent hearing an older
one after a newer (a stage call's, begun before the last change) keeps the newer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

from hpcstage.config.schema import TransferSettings
from hpcstage.core.ratelimit import BYTES_FLOOR, REQUEST_FLOOR, node_share
from hpcstage.errors import HpcstageError
from hpcstage.protocol.messages import NO_LIMITS, RateLimits
from hpcstage.staging.agents import AgentClient
from hpcstage.staging.nodes import NodePool

log = logging.getLogger("hpcstage.daemon")

# Seconds a ``rates`` call may take: a hung agent holds up only its own next message (and
# its stage call fails on its own); a message given up is not resent, the next change is.
TELL_TIMEOUT: Final = 10.0


def transferring(
    shares: RateShares | None, node: str
) -> contextlib.AbstractAsyncContextManager[RateLimits]:
    """``shares.transferring(node)``, or no limits when there are no shares (tests)."""
    return contextlib.nullcontext(NO_LIMITS) if shares is None else shares.transferring(node)


def node_rates(
    settings: TransferSettings, nodes_transferring: int, generation: int = 0
) -> RateLimits:
    """One node's limits while ``nodes_transferring`` nodes (itself included) transfer."""
    s, n = settings, nodes_transferring
    return RateLimits(
        download=_whole(node_share(s.node_download_rate, s.site_download_rate, n, BYTES_FLOOR)),
        upload=_whole(node_share(s.node_upload_rate, s.site_upload_rate, n, BYTES_FLOOR)),
        requests=node_share(s.node_request_rate, s.site_request_rate, n, REQUEST_FLOOR),
        generation=generation,
    )


def _whole(bytes_per_second: float) -> int:
    """Bytes per second on the wire: at least 1 where there is a limit (0 is none)."""
    return max(int(bytes_per_second), 1) if bytes_per_second > 0 else 0


@dataclass
class RateShares:
    """Which nodes transfer now, and the limits each is told."""

    settings: TransferSettings
    nodes: NodePool
    tell_timeout: float = TELL_TIMEOUT
    _calls: dict[str, int] = field(default_factory=dict)  # node -> stage calls in flight
    _generation: int = 0  # counts the changes of N: the generation of every share handed out
    _telling: dict[str, asyncio.Task[None]] = field(default_factory=dict)  # at most one a node
    _stale: set[str] = field(default_factory=set)  # nodes whose share changed since told

    @property
    def _site_limited(self) -> bool:
        s = self.settings
        return bool(s.site_download_rate or s.site_upload_rate or s.site_request_rate)

    def current(self) -> RateLimits:
        """A transferring node's limits now."""
        return node_rates(self.settings, len(self._calls), self._generation)

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
        """N changed: tell every other transferring node its new share (only site limits
        change it), through the node's one message task (started if it has none)."""
        self._generation += 1
        if not self._site_limited:
            return
        for node in self._calls:
            if node == skip:
                continue
            self._stale.add(node)
            if node not in self._telling:
                self._telling[node] = asyncio.create_task(self._tell(node))

    async def _tell(self, node: str) -> None:
        """Send ``node`` its share until it has the latest (or is no longer transferring)."""
        try:
            while node in self._stale and node in self._calls:
                self._stale.discard(node)
                if not await self._send(node):
                    break
        finally:
            # In the same step as the loop's last test: a change from now on starts a task.
            self._stale.discard(node)
            del self._telling[node]

    async def _send(self, node: str) -> bool:
        """One ``rates`` call with the share as of now; False if it failed or timed out."""
        try:
            await asyncio.wait_for(self._rates(node), self.tell_timeout)
        except (HpcstageError, OSError, EOFError, TimeoutError) as exc:
            # Its stage call fails the same way and is retried (with its share), or the next
            # change is sent: nothing to do here.
            log.debug("could not tell %s its store rate limits: %s", node, str(exc) or "timed out")
            return False
        return True

    async def _rates(self, node: str) -> None:
        rpc = await self.nodes.agent(node)
        if node in self._calls:  # the share as of now, not as of the change
            await AgentClient(rpc, node).rates(self.current())

"""Typed calls to a node's agent: one method per call, over one session (``RpcClient``).

Requests are built and replies read as the message types of ``hpcstage.protocol.messages``;
a reply or progress message that does not have its type's shape is a ``ProtocolError``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from hpcstage.errors import ProtocolError
from hpcstage.protocol import messages as m
from hpcstage.protocol.framing import ProgressFn
from hpcstage.protocol.wire import from_wire, to_wire

log = logging.getLogger("hpcstage.staging.agents")

Req = TypeVar("Req")
Rep = TypeVar("Rep")
P = TypeVar("P")


class Caller(Protocol):
    """What the client needs of a session: ``RpcClient.call`` (or a fake of it in tests)."""

    async def call(
        self, op: str, params: dict[str, Any], on_progress: ProgressFn | None = None
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class AgentClient:
    """One node's agent, called with typed messages."""

    session: Caller
    node: str = ""  # for log lines

    async def hello(self, request: m.HelloRequest) -> m.HelloReply:
        """Hand over store settings and limits (first call of every session)."""
        return await self._call(m.HELLO, request)

    async def credentials(self, request: m.CredentialsRequest) -> m.CredentialsReply:
        """Hand over renewed store credentials."""
        return await self._call(m.CREDENTIALS, request)

    async def stage(
        self, request: m.StageRequest, on_progress: Callable[[m.StageProgress], None]
    ) -> m.StageReply:
        """Stage inputs into the node cache (and the job's view)."""
        return await self._call(m.STAGE, request, self._progress(m.StageProgress, on_progress))

    async def stage_out(
        self, request: m.StageOutRequest, on_progress: Callable[[m.StageOutProgress], None]
    ) -> m.StageOutReply:
        """Upload a finished job's outputs."""
        progress = self._progress(m.StageOutProgress, on_progress)
        return await self._call(m.STAGE_OUT, request, progress)

    async def release(self, request: m.ReleaseRequest) -> m.ReleaseReply:
        """End a job's lease: drop its view."""
        return await self._call(m.RELEASE, request)

    async def usage(self) -> m.UsageReply:
        """What the node cache holds."""
        return await self._call(m.USAGE, m.Empty())

    async def evict(self, request: m.EvictRequest) -> m.EvictReply:
        """Apply the eviction policy now."""
        return await self._call(m.EVICT, request)

    async def drop_source(self, source: m.SourceSpec) -> m.DropSourceReply:
        """Evict a source's cached objects, those in use by a job excepted."""
        return await self._call(m.DROP_SOURCE, m.DropSourceRequest(source))

    async def rates(self, request: m.RateLimits) -> m.Empty:
        """Change the agent's store rate limits (its share of the site's changed)."""
        return await self._call(m.RATES, request)

    async def ping(self) -> m.PingReply:
        """Check that the agent answers."""
        return await self._call(m.PING, m.Empty())

    async def peer_list(self, request: m.PeerListRequest) -> m.PeerListReply:
        """A page of what the cache holds of a source."""
        return await self._call(m.PEER_LIST, request)

    async def peer_want(self, ids: list[str]) -> m.PeerWantReply:
        """Which of these cache ids the cache lacks."""
        return await self._call(m.PEER_WANT, m.PeerIds(ids))

    async def peer_read(self, ids: list[str]) -> m.PeerReadReply:
        """The bytes of these cache ids."""
        return await self._call(m.PEER_READ, m.PeerIds(ids))

    async def peer_put(self, request: m.PeerPutRequest) -> m.PeerPutReply:
        """Objects from a peer's cache, for this cache to check and keep."""
        return await self._call(m.PEER_PUT, request)

    async def peer_serve(self, request: m.PeerServeRequest) -> m.PeerServeReply:
        """Open a short-lived listener serving these cache ids to one token's holder."""
        return await self._call(m.PEER_SERVE, request)

    async def peer_fetch(self, request: m.PeerFetchRequest) -> m.PeerPutReply:
        """Fetch objects node to node from a peer's listener, verify and keep them."""
        return await self._call(m.PEER_FETCH, request)

    async def _call(
        self, rpc: m.Rpc[Req, Rep], request: Req, on_progress: ProgressFn | None = None
    ) -> Rep:
        reply = await self.session.call(rpc.op, to_wire(request), on_progress)
        return from_wire(rpc.reply, reply)

    def _progress(self, cls: type[P], on_progress: Callable[[P], None]) -> ProgressFn:
        def take(data: dict[str, Any]) -> None:
            try:
                message = from_wire(cls, data)
            except ProtocolError as exc:  # the call's result still comes, checked as strictly
                log.error("agent on %s sent malformed progress: %s", self.node, exc)
                return
            on_progress(message)

        return take

"""Peer copy, the daemon's side: filling one node's cache from another node's.

When a node must stage a source that another node's cache already holds (a job that starts
on nodes other than the planned ones, a dataset needed on a new node, the other nodes of a
multi-node job once the first has fetched it), the daemon first has the two agents copy what
the node lacks, then runs the normal stage, which lists the store, finds those objects cached
and fetches only the rest. The store stays the source of truth: a peer's version of a key
that has changed since is simply not used by the stage (and is evicted in time), and nothing
a peer sends is trusted without checking it.

Two ways, by size. Small objects (up to ``PEER_RELAY_MAX``) go through the daemon's own
sessions in batches (``peer_read`` + ``peer_put``): for them the per-request cost of the store
is what a peer saves, and they need no new trust between nodes. Bigger ones go node to node,
the daemon out of the data path (``peer_serve`` + ``peer_fetch``, ``hpcstage.agent.direct``):
the daemon makes a one-time token and proof, the holder opens a listener on its cluster
address serving only those objects to that token, and the receiver streams, verifies and
commits them. Only the direct way is free of the daemon's bandwidth, so only the relay is
rationed (``relay``).

A top-up for a job that runs already (Slurm started it on nodes other than the planned ones:
it waits at ``hpcstage env``) sends its small objects node to node as well
(``Route.small_direct``): hundreds of small files through two rationed relays, base64 over
the daemon's SSH sessions, would keep the job waiting for minutes; node to node they move at
the nodes' disk and network speed, and the relay stays free for pending jobs.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from hpcstage.protocol.messages import (
    PEER_KINDS,
    PEER_RELAY_MAX,
    PeerFetchRequest,
    PeerListRequest,
    PeerObject,
    PeerPutReply,
    PeerPutRequest,
    PeerSent,
    PeerServeRequest,
    SourceSpec,
)
from hpcstage.staging.agents import AgentClient

PAGE: Final = 1000  # rows per peer_list
BATCH_BYTES: Final = 4 * 1024 * 1024  # raw bytes per peer_read (base64 on the wire: 5.4 MiB)
DIRECT_BATCH: Final = 64  # big objects per listener
# Small objects per listener on a running job's top-up: a listener costs two daemon calls,
# worth it for 64 big objects, not for 64 small ones.
DIRECT_SMALL_BATCH: Final = 512
LISTEN_TTL: Final = 120.0  # seconds a listener waits for the next connection, none running


@dataclass(frozen=True)
class Route:
    """How ``copy_from_peer`` may move bytes: ``relay`` small objects through the daemon;
    ``direct_host``: the holder's address to listen on for big ones ("": not node to node);
    ``small_direct``: small ones node to node too (a running job waits for them), where
    ``direct_host`` is given."""

    relay: bool
    direct_host: str
    small_direct: bool = False

    @property
    def all_direct(self) -> bool:
        """Every object goes node to node: the relay is not used."""
        return self.small_direct and bool(self.direct_host)


@dataclass
class PeerCopy:
    """What one peer copy moved: objects and bytes committed, objects refused."""

    objects: int = 0
    bytes: int = 0
    refused: int = 0

    def add(self, reply: PeerPutReply) -> None:
        self.objects += reply.objects
        self.bytes += reply.bytes
        self.refused += reply.refused


def copyable(source: SourceSpec) -> bool:
    """True for the sources peers copy: an S3 object or the objects under an S3 prefix (that
    its globs take); not a pinned version (a peer's cache indexes objects by key, as listed)."""
    return source.kind in PEER_KINDS and not source.version_id


async def copy_from_peer(
    node: AgentClient,
    peer: AgentClient,
    source: SourceSpec,
    route: Route,
    max_bytes: int | None = None,
) -> PeerCopy:
    """Copy what ``peer``'s cache holds of ``source`` and ``node``'s lacks, at most about
    ``max_bytes``, by ``route``. Reading the next relay batch from the peer overlaps
    committing the previous one on the node."""
    total = PeerCopy()
    after = ""
    while True:
        page = await peer.peer_list(PeerListRequest(source, after, PAGE))
        if page.objects:
            want = set((await node.peer_want([r.cache_id for r in page.objects])).want)
            wanted = [r for r in page.objects if r.cache_id in want and _routed(r, route)]
            if max_bytes is not None:
                wanted = _within(wanted, max_bytes - total.bytes)
            small = [r for r in wanted if r.size <= PEER_RELAY_MAX and not route.all_direct]
            big = [r for r in wanted if r.size > PEER_RELAY_MAX or route.all_direct]
            # Both ways at once; the first failure is raised once both have ended.
            ended = await asyncio.gather(
                _move(node, peer, source, small, total),
                _direct(node, peer, source, big, route.direct_host, total),
                return_exceptions=True,
            )
            for outcome in ended:
                if isinstance(outcome, BaseException):
                    raise outcome
        after = page.next
        if not after or (max_bytes is not None and total.bytes >= max_bytes):
            return total


def _routed(row: PeerObject, route: Route) -> bool:
    if row.size > PEER_RELAY_MAX or route.all_direct:
        return bool(route.direct_host)
    return route.relay


async def _direct(
    node: AgentClient,
    peer: AgentClient,
    source: SourceSpec,
    rows: list[PeerObject],
    host: str,
    total: PeerCopy,
) -> None:
    """Have ``node`` fetch ``rows`` straight from ``peer``: one listener, one token, per
    batch; the secrets cross only the daemon's two SSH sessions."""
    small = all(r.size <= PEER_RELAY_MAX for r in rows)
    per_listener = DIRECT_SMALL_BATCH if small else DIRECT_BATCH
    for start in range(0, len(rows), per_listener):
        ids = [r.cache_id for r in rows[start : start + per_listener]]
        token, proof = secrets.token_hex(32), secrets.token_hex(32)
        offer = await peer.peer_serve(PeerServeRequest(ids, host, token, proof, LISTEN_TTL))
        if offer.objects:
            fetch = PeerFetchRequest(source, host, offer.port, token, proof, offer.objects)
            total.add(await node.peer_fetch(fetch))


async def _move(
    node: AgentClient,
    peer: AgentClient,
    source: SourceSpec,
    rows: list[PeerObject],
    total: PeerCopy,
) -> None:
    putting: asyncio.Task[PeerPutReply] | None = None
    try:
        for batch in _batches(rows):
            got = await peer.peer_read([r.cache_id for r in batch])
            bodies = {b.cache_id: b.data for b in got.objects}
            objects = [_sent(r, bodies[r.cache_id]) for r in batch if r.cache_id in bodies]
            if putting is not None:
                total.add(await putting)
            putting = asyncio.create_task(node.peer_put(PeerPutRequest(source, objects)))
        if putting is not None:
            total.add(await putting)
            putting = None
    finally:
        if putting is not None and not putting.done():
            putting.cancel()


def _sent(row: PeerObject, data: str) -> PeerSent:
    return PeerSent(row.cache_id, row.key, row.etag, row.size, row.sha256, data)


def _batches(rows: list[PeerObject]) -> Iterator[list[PeerObject]]:
    batch: list[PeerObject] = []
    size = 0
    for row in rows:
        if batch and size + row.size > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(row)
        size += row.size
    if batch:
        yield batch


def _within(rows: list[PeerObject], budget: int) -> list[PeerObject]:
    kept: list[PeerObject] = []
    for row in rows:
        if budget < row.size:
            break
        budget -= row.size
        kept.append(row)
    return kept

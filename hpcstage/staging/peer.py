"""Peer copy, the daemon's side: filling one node's cache from another node's.

When a node must stage a source that another node's cache already holds (a job that starts
on nodes other than the planned ones, a dataset needed on a new node), the daemon first moves
the small objects it can between the two agents, then runs the normal stage, which lists the
store, finds those objects cached and fetches only the rest. The store stays the source of
truth: a peer's version of a key that has changed since is simply not used by the stage (and
is evicted in time), and nothing a peer sends is trusted without checking it.

Why through the daemon and not node to node: it needs no new trust between compute nodes, no
listening port and no key on them; the daemon already holds a session to every node. The
cost is that bytes pass through the daemon host, so only objects up to ``PEER_MAX`` (the
agent's, ``hpcstage.agent.peer``) go this way: for them the per-request cost of the store is
what a peer saves. Bigger objects come from the store in parallel ranged GETs, where
bandwidth, not requests, is the limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from hpcstage.protocol.messages import (
    PEER_KINDS,
    PeerListRequest,
    PeerObject,
    PeerPutReply,
    PeerPutRequest,
    PeerSent,
    SourceSpec,
)
from hpcstage.staging.agents import AgentClient

PAGE: Final = 1000  # rows per peer_list
BATCH_BYTES: Final = 4 * 1024 * 1024  # raw bytes per peer_read (base64 on the wire: 5.4 MiB)


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
    node: AgentClient, peer: AgentClient, source: SourceSpec, max_bytes: int | None = None
) -> PeerCopy:
    """Copy what ``peer``'s cache holds of ``source`` and ``node``'s lacks (small objects
    only), at most about ``max_bytes``. Reading the next batch from the peer overlaps
    committing the previous one on the node."""
    total = PeerCopy()
    after = ""
    while True:
        page = await peer.peer_list(PeerListRequest(source, after, PAGE))
        if page.objects:
            want = set((await node.peer_want([r.cache_id for r in page.objects])).want)
            wanted = [r for r in page.objects if r.cache_id in want]
            if max_bytes is not None:
                wanted = _within(wanted, max_bytes - total.bytes)
            await _move(node, peer, source, wanted, total)
        after = page.next
        if not after or (max_bytes is not None and total.bytes >= max_bytes):
            return total


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

"""Peer copy: filling one node's cache from another node's, through the daemon's agent sessions.

When a node must stage a source that another node's cache already holds (a job that starts
on nodes other than the planned ones, a dataset needed on a new node), the daemon first moves
the small objects it can between the two agents, then runs the normal stage, which lists the
store, finds those objects cached and fetches only the rest. The store stays the source of
truth: a peer's version of a key that has changed since is simply not used by the stage (and
is evicted in time), and nothing a peer sends is trusted without checking it.

Why through the daemon and not node to node: it needs no new trust between compute nodes, no
listening port and no key on them; the daemon already holds a session to every node. The
cost is that bytes pass through the daemon host, so only objects up to ``PEER_MAX`` go this
way: for them the per-request cost of the store is what a peer saves. Bigger objects come
from the store in parallel ranged GETs, where bandwidth, not requests, is the limit.

Agent side (handlers registered in agent.py):
  ``peer_list``  what this cache holds under a source: a page of
                 ``[cache_id, key, etag, size, sha256]`` (the newest version of each key)
  ``peer_want``  which of these cache ids this cache lacks
  ``peer_read``  the bytes of some cache ids (base64), as indexed
  ``peer_put``   verify and commit objects another cache sent
Daemon side: ``copy_from_peer`` drives one source from one peer to one node.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from hpcstage.cache.commit import GROUP_COMMIT_MAX
from hpcstage.core.identity import ObjectRef
from hpcstage.errors import HpcstageError

if TYPE_CHECKING:
    from hpcstage.agent.main import Agent
    from hpcstage.protocol.framing import ProgressFn, RpcClient

PEER_MAX: Final = GROUP_COMMIT_MAX  # objects up to this size go from peer to peer
PAGE: Final = 1000  # rows per peer_list
BATCH_BYTES: Final = 4 * 1024 * 1024  # raw bytes per peer_read (base64 on the wire: 5.4 MiB)
_PLAIN_MD5: Final = re.compile(r"[0-9a-f]{32}")
_SHA256: Final = re.compile(r"[0-9a-f]{64}")

Listed = list[Any]  # [cache_id, key, etag, size, sha256]


@dataclass
class PeerCopy:
    """What one peer copy moved: objects and bytes committed, objects refused."""

    objects: int = 0
    bytes: int = 0
    refused: int = 0


# -- agent side -------------------------------------------------------------------------------


def _source_scope(agent: Agent, source: dict[str, Any]) -> tuple[str, str, str, bool]:
    """(store id, bucket, key prefix, exact key?) of an S3 source; HpcstageError otherwise."""
    kind = source.get("kind")
    if kind not in ("s3-prefix", "s3-key"):
        raise HpcstageError(f"peer copy covers S3 sources only, not {kind!r}")
    bucket, key = str(source["bucket"]), str(source["key"])
    return agent.s3_store(bucket).store_id, bucket, key, kind == "s3-key"


async def peer_list(agent: Agent, params: dict[str, Any], _progress: ProgressFn) -> dict[str, Any]:
    """A page of what this cache holds of ``source``, after the key ``after``."""
    store_id, bucket, prefix, exact = _source_scope(agent, params["source"])
    limit = max(1, min(int(params.get("limit", PAGE)), PAGE))
    rows, cursor = await asyncio.to_thread(
        agent.cache.holdings, store_id, bucket, prefix, str(params.get("after", "")), limit
    )
    found = [
        [r.cache_id, r.key, r.etag, r.size, r.sha256]
        for r in rows
        if r.size <= PEER_MAX and (not exact or r.key == prefix)
    ]
    return {"objects": found, "next": "" if exact else cursor}


async def peer_want(agent: Agent, params: dict[str, Any], _progress: ProgressFn) -> dict[str, Any]:
    """The cache ids of ``ids`` this cache does not hold."""
    ids = [str(i) for i in params["ids"]]
    held = await asyncio.to_thread(agent.cache.held, ids)
    return {"want": [i for i in ids if i not in held]}


async def peer_read(agent: Agent, params: dict[str, Any], _progress: ProgressFn) -> dict[str, Any]:
    """``[cache_id, base64 bytes]`` of those ``ids`` this cache still holds."""

    def read() -> list[list[str]]:
        out = []
        for cache_id in params["ids"]:
            found = agent.cache.read_object(str(cache_id), PEER_MAX)
            if found is not None:
                out.append([found[0].cache_id, base64.b64encode(found[1]).decode()])
        return out

    return {"objects": await asyncio.to_thread(read)}


async def peer_put(agent: Agent, params: dict[str, Any], _progress: ProgressFn) -> dict[str, Any]:
    """Verify each object another cache sent and commit the good ones (group commit).

    An object is taken only if it is one of ``source``'s keys in this site's store, its
    identity gives the cache id it was sent under, and its bytes have the listed size, the
    SHA-256 the peer indexed and, for a plain-MD5 ETag, that MD5. Anything else is refused and
    counted; the stage that follows fetches it from the store.
    """
    store_id, bucket, prefix, exact = _source_scope(agent, params["source"])
    result = PeerCopy()
    waits = []
    for entry in params["objects"]:
        checked = _checked(entry, store_id, bucket, prefix, exact)
        if checked is None:
            result.refused += 1
            continue
        ref, body, sha256 = checked

        async def read(body: bytes = body, sha256: str = sha256) -> tuple[bytes, str]:
            return body, sha256

        waits.append(agent.cache.ensure_small(ref, read, peer=True))
        result.objects += 1
        result.bytes += ref.size
    await asyncio.gather(*waits)
    agent.cache.stats.peer_refused += result.refused
    return {"objects": result.objects, "bytes": result.bytes, "refused": result.refused}


def _checked(
    entry: Any, store_id: str, bucket: str, prefix: str, exact: bool
) -> tuple[ObjectRef, bytes, str] | None:
    try:
        cache_id, key, etag, size, sha256, encoded = entry
        body = base64.b64decode(encoded, validate=True)
    except (TypeError, ValueError, binascii.Error):
        return None
    if not (isinstance(key, str) and isinstance(etag, str) and isinstance(size, int)):
        return None
    if not key.startswith(prefix) or (exact and key != prefix) or not etag:
        return None
    ref = ObjectRef(store_id, bucket, key, etag, size)
    if ref.cache_id != cache_id or len(body) != size or size > PEER_MAX:
        return None
    if not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        return None
    if hashlib.sha256(body).hexdigest() != sha256:
        return None
    if _PLAIN_MD5.fullmatch(etag) and hashlib.md5(body, usedforsecurity=False).hexdigest() != etag:
        return None
    return ref, body, sha256


# -- daemon side ------------------------------------------------------------------------------


async def copy_from_peer(
    node: RpcClient, peer: RpcClient, source: dict[str, Any], max_bytes: int | None = None
) -> PeerCopy:
    """Copy what ``peer``'s cache holds of ``source`` and ``node``'s lacks (small objects
    only), at most about ``max_bytes``. Reading the next batch from the peer overlaps
    committing the previous one on the node."""
    total = PeerCopy()
    after = ""
    while True:
        page = await peer.call("peer_list", {"source": source, "after": after, "limit": PAGE})
        rows: list[Listed] = page["objects"]
        if rows:
            want = set((await node.call("peer_want", {"ids": [r[0] for r in rows]}))["want"])
            wanted = [r for r in rows if r[0] in want]
            if max_bytes is not None:
                wanted = _within(wanted, max_bytes - total.bytes)
            await _move(node, peer, source, wanted, total)
        after = page["next"]
        if not after or (max_bytes is not None and total.bytes >= max_bytes):
            return total


async def _move(
    node: RpcClient, peer: RpcClient, source: dict[str, Any], rows: list[Listed], total: PeerCopy
) -> None:
    putting: asyncio.Task[dict[str, Any]] | None = None
    try:
        for batch in _batches(rows):
            got = await peer.call("peer_read", {"ids": [r[0] for r in batch]})
            bodies = dict(got["objects"])
            objects = [[*r, bodies[r[0]]] for r in batch if r[0] in bodies]
            if putting is not None:
                _add(total, await putting)
            putting = asyncio.create_task(
                node.call("peer_put", {"source": source, "objects": objects})
            )
        if putting is not None:
            _add(total, await putting)
            putting = None
    finally:
        if putting is not None and not putting.done():
            putting.cancel()


def _add(total: PeerCopy, reply: dict[str, Any]) -> None:
    total.objects += int(reply["objects"])
    total.bytes += int(reply["bytes"])
    total.refused += int(reply["refused"])


def _batches(rows: list[Listed]) -> Iterator[list[Listed]]:
    batch: list[Listed] = []
    size = 0
    for row in rows:
        if batch and size + int(row[3]) > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(row)
        size += int(row[3])
    if batch:
        yield batch


def _within(rows: list[Listed], budget: int) -> list[Listed]:
    kept: list[Listed] = []
    for row in rows:
        if budget < int(row[3]):
            break
        budget -= int(row[3])
        kept.append(row)
    return kept

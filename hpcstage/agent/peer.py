"""Peer copy, the node's side: what this cache holds of a source, and taking what a peer sent.

Why peer copy, and how the daemon drives it between two agents: ``hpcstage.staging.peer``.
Nothing a peer sends is trusted: each object is checked against its identity, size and
digests before it is committed (``peer_put``).

  ``peer_list``  a page of what this cache holds under a source (the newest version of each key;
                 objects of any size: those above PEER_MAX go node to node, ``agent/direct.py``)
  ``peer_want``  which of these cache ids this cache lacks
  ``peer_read``  the bytes of some cache ids up to PEER_MAX (base64), as indexed
  ``peer_put``   verify and commit objects another cache sent
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Final

from hpcstage.agent.context import NodeContext
from hpcstage.cache.commit import GROUP_COMMIT_MAX
from hpcstage.cache.index import Row
from hpcstage.core.directives import SourceKind
from hpcstage.core.filters import KeyFilter
from hpcstage.core.identity import ObjectRef
from hpcstage.errors import HpcstageError
from hpcstage.protocol.messages import (
    PEER_KINDS,
    PeerBody,
    PeerIds,
    PeerListReply,
    PeerListRequest,
    PeerObject,
    PeerPutReply,
    PeerPutRequest,
    PeerReadReply,
    PeerSent,
    PeerWantReply,
    SourceSpec,
)

PEER_MAX: Final = GROUP_COMMIT_MAX  # objects up to this size go through the daemon (peer_read)
PAGE: Final = 1000  # rows per peer_list, at most
_PLAIN_MD5: Final = re.compile(r"[0-9a-f]{32}")
_SHA256: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Scope:
    """Which cached objects a source covers: one exact key, or the keys under a prefix that
    its include/exclude globs take (a filtered-out object is never copied either)."""

    store_id: str
    bucket: str
    key: str
    exact: bool
    key_filter: KeyFilter

    def covers(self, key: str) -> bool:
        if self.exact:
            return key == self.key
        return key.startswith(self.key) and self.key_filter.takes(key[len(self.key) :])

    def current(self, row: Row) -> bool:
        """Whether ``row`` is an object as listed (not a pinned version of its key, which a
        peer could not verify against the identity it is sent under)."""
        ref = ObjectRef(self.store_id, self.bucket, row.key, row.etag, row.size)
        return ref.cache_id == row.cache_id


def source_scope(ctx: NodeContext, source: SourceSpec) -> Scope:
    """The scope of an S3 source; HpcstageError for any other."""
    if source.kind not in PEER_KINDS:
        raise HpcstageError(f"peer copy covers S3 sources only, not {source.kind.value!r}")
    if source.version_id:
        raise HpcstageError("peer copy does not cover a pinned object version")
    store_id = ctx.stores.s3(source.bucket).store_id
    exact = source.kind is SourceKind.S3_OBJECT
    return Scope(store_id, source.bucket, source.key, exact, source.key_filter())


async def peer_list(ctx: NodeContext, request: PeerListRequest) -> PeerListReply:
    """A page of what this cache holds of ``source``, after the key ``after``."""
    scope = source_scope(ctx, request.source)
    limit = max(1, min(request.limit, PAGE))
    rows, cursor = await asyncio.to_thread(
        ctx.cache.holdings, scope.store_id, scope.bucket, scope.key, request.after, limit
    )
    found = [
        PeerObject(r.cache_id, r.key, r.etag, r.size, r.sha256)
        for r in rows
        if scope.covers(r.key) and scope.current(r)
    ]
    return PeerListReply(objects=found, next="" if scope.exact else cursor)


async def peer_want(ctx: NodeContext, request: PeerIds) -> PeerWantReply:
    """The cache ids of ``ids`` this cache does not hold."""
    held = await asyncio.to_thread(ctx.cache.held, request.ids)
    return PeerWantReply(want=[i for i in request.ids if i not in held])


async def peer_read(ctx: NodeContext, request: PeerIds) -> PeerReadReply:
    """The bytes of those ``ids`` this cache still holds."""

    def read() -> list[PeerBody]:
        out = []
        for cache_id in request.ids:
            found = ctx.cache.read_object(cache_id, PEER_MAX)
            if found is not None:
                out.append(PeerBody(found[0].cache_id, base64.b64encode(found[1]).decode()))
        return out

    return PeerReadReply(objects=await asyncio.to_thread(read))


async def peer_put(ctx: NodeContext, request: PeerPutRequest) -> PeerPutReply:
    """Verify each object another cache sent and commit the good ones (group commit).

    An object is taken only if it is one of ``source``'s keys in this site's store, its
    identity gives the cache id it was sent under, and its bytes have the listed size, the
    SHA-256 the peer indexed and, for a plain-MD5 ETag, that MD5. Anything else is refused and
    counted; the stage that follows fetches it from the store.
    """
    scope = source_scope(ctx, request.source)
    objects = size = refused = 0
    waits = []
    for sent in request.objects:
        checked = _checked(sent, scope)
        if checked is None:
            refused += 1
            continue
        ref, body = checked

        async def read(body: bytes = body, sha256: str = sent.sha256) -> tuple[bytes, str]:
            return body, sha256

        waits.append(ctx.cache.ensure_small(ref, read, peer=True))
        objects, size = objects + 1, size + ref.size
    await asyncio.gather(*waits)
    ctx.cache.stats.peer_refused += refused
    return PeerPutReply(objects=objects, bytes=size, refused=refused)


def _checked(sent: PeerSent, scope: Scope) -> tuple[ObjectRef, bytes] | None:
    """The identity and bytes of ``sent`` if every check passes; None to refuse it."""
    try:
        body = base64.b64decode(sent.data, validate=True)
    except (ValueError, binascii.Error):
        return None
    if not scope.covers(sent.key) or not sent.etag:
        return None
    ref = ObjectRef(scope.store_id, scope.bucket, sent.key, sent.etag, sent.size)
    if ref.cache_id != sent.cache_id or len(body) != sent.size or sent.size > PEER_MAX:
        return None
    if not _SHA256.fullmatch(sent.sha256) or hashlib.sha256(body).hexdigest() != sent.sha256:
        return None
    plain_md5 = _PLAIN_MD5.fullmatch(sent.etag) is not None
    if plain_md5 and hashlib.md5(body, usedforsecurity=False).hexdigest() != sent.etag:
        return None
    return ref, body

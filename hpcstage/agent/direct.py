"""Node-to-node copy of big objects: one agent serves, another fetches, the daemon only
introduces them (``hpcstage.staging.peer`` decides who copies what).

  ``peer_serve``  open a short-lived listener that serves some cache ids to one token
  ``peer_fetch``  fetch those objects from it, verify every byte, commit the good ones

Why a listener at all, and who may use it: the bytes of a big object must not cross the
daemon host, so the holding node listens, but nothing a user of either node can reach gains
them anything. The daemon makes two random secrets per copy and hands them out over its SSH
sessions only, to the holder and to the receiver. The listener binds to the address
the daemon names (the node's cluster address, never a wildcard), lets a connection have
nothing until it presents the token, serves each cache id once (a second request for it, by
anyone, gets nothing), and stops accepting as soon as every id was served, or once ``ttl``
seconds pass with no transfer to the token's holder running (however long the objects take,
the receiver's next request follows a finished one at once; connections without the token
do not keep it open). It answers the proof first, so the receiver knows it talks to the
holder's agent and not to something that took the port after the listener closed. Tokens
never reach argv, the environment or a file.

The stream, after ``HPCSTAGE-PEER/1 <token> <cache_id>\\n`` from the receiver:
``<proof> <size>\\n``, the object's ``size`` bytes, then ``<sha256>\\n`` of the bytes the
holder read. Anything else (a wrong token, an id not offered or already served, an object
evicted since) closes the connection; for a wrong token, before any byte is sent.

The receiver trusts nothing it reads: the object's identity must give its cache id, the
proof must match, and the bytes it wrote must have the listed size, the holder's trailer
SHA-256, the SHA-256 the holder's cache recorded (when it has one) and, for a plain-MD5 ETag,
that MD5 (an object encrypted with SSE-KMS or SSE-C, whose ETag looks like an MD5 and is
none, fails that check: a miss). It writes them to a temp file and commits them exactly as
a download from the store (``NodeCache.ensure``: durable in the background, see
cache/durable.py); any failure is a miss, which the stage that follows fetches from the
store.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

from hpcstage.agent.context import NodeContext
from hpcstage.agent.peer import source_scope
from hpcstage.cache.commit import PendingObject
from hpcstage.core.identity import ObjectRef
from hpcstage.errors import HpcstageError
from hpcstage.protocol.messages import (
    PeerFetchRequest,
    PeerObject,
    PeerPutReply,
    PeerServeReply,
    PeerServeRequest,
)
from hpcstage.store.verify import PLAIN_MD5, new_md5

log = logging.getLogger(__name__)

MAGIC: Final = "HPCSTAGE-PEER/1"
CHUNK: Final = 4 << 20  # bytes per read, write and hash step
PARALLEL: Final = 4  # objects fetched at once from one peer
HELLO_TIMEOUT: Final = 10.0  # a connection that sends no request line by then gets nothing
IO_TIMEOUT: Final = 60.0  # silence on a transfer after which it counts as failed
MAX_TTL: Final = 600.0
_LINE_MAX: Final = 256
_SECRET: Final = re.compile(r"[0-9a-f]{64}")


class _PeerMiss(HpcstageError):
    """A peer's object could not be had or did not verify (the store will serve it)."""


# -- the holder's side ----------------------------------------------------------------------


@dataclass
class _Offer:
    """What one listener still serves, and to whom."""

    ctx: NodeContext
    token: str
    proof: str
    left: dict[str, PeerObject]
    ttl: float
    server: asyncio.Server | None = None
    serving: int = 0  # transfers running (connections that presented the token)
    _idle: asyncio.TimerHandle | None = None

    def open(self, server: asyncio.Server) -> None:
        """Serve through ``server`` until idle for ``ttl`` seconds."""
        self.server = server
        self.touch()

    def touch(self) -> None:
        """Something happened: the idle time starts again (the handle keeps the offer)."""
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(self.ttl, self._expire)

    def _expire(self) -> None:
        if self.serving:  # transfers still running: the receiver's next request may follow
            self.touch()
        elif self.server is not None:
            self.server.close()

    def claim(self, line: bytes) -> PeerObject | None:
        """The object a request line asks for, taken off the offer; None to refuse it."""
        parts = line.decode("ascii", "replace").split()
        if len(parts) != 3 or parts[0] != MAGIC:
            return None
        if not hmac.compare_digest(parts[1].encode(), self.token.encode()):
            return None
        found = self.left.pop(parts[2], None)
        if not self.left and self.server is not None:
            self.server.close()  # every id served: accept nothing more
        return found


async def peer_serve(ctx: NodeContext, request: PeerServeRequest) -> PeerServeReply:
    """Open the listener for ``request.ids`` (those this cache holds) on ``request.host``;
    it stops accepting once ``request.ttl`` seconds (at most ``MAX_TTL``) pass with no
    transfer running, or once every id was served."""
    if not (_SECRET.fullmatch(request.token) and _SECRET.fullmatch(request.proof)):
        raise HpcstageError("peer_serve: the token and proof must be 64 hex digits each")
    rows = await asyncio.to_thread(lambda: [ctx.cache.indexed(i) for i in request.ids])
    held = [PeerObject(r.cache_id, r.key, r.etag, r.size, r.sha256) for r in rows if r]
    ttl = min(max(request.ttl, 1.0), MAX_TTL)
    offer = _Offer(ctx, request.token, request.proof, {o.cache_id: o for o in held}, ttl)
    if not held:
        return PeerServeReply(port=0, objects=[])
    try:
        server = await asyncio.start_server(
            lambda r, w: _serve_connection(offer, r, w), request.host, 0, reuse_address=False
        )
    except OSError as exc:
        raise HpcstageError(f"cannot listen on {request.host} for a peer: {exc}") from exc
    offer.open(server)
    port: int = server.sockets[0].getsockname()[1]
    return PeerServeReply(port=port, objects=held)


async def _serve_connection(
    offer: _Offer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    peer = writer.get_extra_info("peername")
    try:
        line = await asyncio.wait_for(reader.readline(), HELLO_TIMEOUT)
        obj = offer.claim(line) if len(line) <= _LINE_MAX else None
        if obj is None:
            log.warning("peer listener: refused a connection from %s (no valid request)", peer)
            return
        offer.serving += 1
        try:
            await _send_object(offer, obj, writer)
        finally:
            # Only a served transfer keeps the listener open: connections without the token
            # cannot hold it open by coming again.
            offer.serving -= 1
            offer.touch()
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
        log.warning("peer listener: connection from %s ended: %s", peer, exc or type(exc))
    finally:
        writer.close()


async def _send_object(offer: _Offer, obj: PeerObject, writer: asyncio.StreamWriter) -> None:
    opened = await asyncio.to_thread(offer.ctx.cache.open_object, obj.cache_id)
    if opened is None:
        return  # evicted since it was offered: the receiver's stage fetches it from the store
    row, file = opened
    with file:
        writer.write(f"{offer.proof} {row.size}\n".encode())
        digest = hashlib.sha256()
        # The next chunk is read and hashed (in a thread) while this one is sent.
        reading = asyncio.ensure_future(asyncio.to_thread(_read_hashed, file, digest))
        try:
            while chunk := await reading:
                reading = asyncio.ensure_future(asyncio.to_thread(_read_hashed, file, digest))
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
        finally:
            await _settled(reading)  # never close the file under the thread reading it
        writer.write(f"{digest.hexdigest()}\n".encode())
        await asyncio.wait_for(writer.drain(), IO_TIMEOUT)


def _read_hashed(file: BinaryIO, digest: Any) -> bytes:
    chunk = file.read(CHUNK)
    digest.update(chunk)
    return chunk


# -- the receiver's side --------------------------------------------------------------------


async def peer_fetch(ctx: NodeContext, request: PeerFetchRequest) -> PeerPutReply:
    """Fetch, verify and commit ``request.objects`` from the peer's listener, a few at a time.

    An object that fails anything is counted refused (and logged); it is a miss, not an error.
    """
    scope = source_scope(ctx, request.source)
    gate = asyncio.Semaphore(PARALLEL)

    async def one(obj: PeerObject) -> bool:
        ref = ObjectRef(scope.store_id, scope.bucket, obj.key, obj.etag, obj.size)
        if not scope.covers(obj.key) or not obj.etag or ref.cache_id != obj.cache_id:
            return False
        async with gate:
            try:
                await ctx.cache.ensure(ref, lambda p: _receive(request, obj, p), peer=True)
            except (HpcstageError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.warning("peer copy of %s from %s: %s", obj.key, request.host, exc)
                return False
        return True

    done = await asyncio.gather(*(one(o) for o in request.objects))
    good = [o for o, ok in zip(request.objects, done, strict=True) if ok]
    refused = len(done) - len(good)
    ctx.cache.stats.peer_refused += refused
    return PeerPutReply(objects=len(good), bytes=sum(o.size for o in good), refused=refused)


async def _receive(request: PeerFetchRequest, obj: PeerObject, pending: PendingObject) -> str:
    """Write ``obj``'s bytes from the peer into ``pending.fd``; their SHA-256 once verified."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(request.host, request.port, limit=2 * CHUNK), IO_TIMEOUT
    )
    try:
        writer.write(f"{MAGIC} {request.token} {obj.cache_id}\n".encode())
        await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
        head = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
        proof, _, size = head.decode("ascii", "replace").strip().partition(" ")
        if not hmac.compare_digest(proof.encode(), request.proof.encode()):
            raise _PeerMiss("the listener did not answer as the peer's agent")
        if size != str(obj.size):
            raise _PeerMiss(f"the peer offers {size or 'nothing'}, expected {obj.size} bytes")
        return await _take(reader, obj, pending)
    finally:
        writer.close()


async def _take(reader: asyncio.StreamReader, obj: PeerObject, pending: PendingObject) -> str:
    sha256 = hashlib.sha256()
    md5 = new_md5() if PLAIN_MD5.fullmatch(obj.etag) else None
    offset = 0
    writing: asyncio.Future[None] | None = None  # the previous chunk, written and hashed
    try:
        while offset < obj.size:
            want = min(CHUNK, obj.size - offset)
            chunk = await asyncio.wait_for(reader.readexactly(want), IO_TIMEOUT)
            if writing is not None:
                await writing  # in order: the digests see the bytes as they come
            # Written and hashed in a thread while the next chunk arrives.
            writing = asyncio.ensure_future(
                asyncio.to_thread(_write_hashed, pending.fd, offset, chunk, sha256, md5)
            )
            offset += len(chunk)
        if writing is not None:
            await writing
    finally:
        if writing is not None:
            # Never let the fd be closed (and its number reused) under the thread writing.
            await _settled(writing)
    trailer = (await asyncio.wait_for(reader.readline(), IO_TIMEOUT)).decode("ascii", "replace")
    mine = sha256.hexdigest()
    if trailer.strip() != mine:
        raise _PeerMiss("the bytes received differ from those the peer read (SHA-256)")
    if obj.sha256 and obj.sha256 != mine:
        raise _PeerMiss("the bytes differ from the SHA-256 the peer's cache recorded")
    if md5 is not None and md5.hexdigest() != obj.etag.lower():
        raise _PeerMiss(f"the bytes do not have the MD5 of the ETag {obj.etag}")
    return mine


async def _settled(work: asyncio.Future[Any]) -> None:
    """Wait until ``work`` (a thread's) has ended, whatever it raised: its outcome is the
    caller's business, or moot once the transfer failed."""
    if not work.done():
        await asyncio.wait([work])
    if not work.cancelled():
        work.exception()  # retrieved: asyncio would log it otherwise


def _write_hashed(fd: int, offset: int, chunk: bytes, sha256: Any, md5: Any | None) -> None:
    view = memoryview(chunk)
    at = offset
    while view:
        written = os.pwrite(fd, view, at)
        view, at = view[written:], at + written
    sha256.update(chunk)
    if md5 is not None:
        md5.update(chunk)

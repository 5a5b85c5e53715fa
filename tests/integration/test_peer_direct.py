"""Node-to-node copy (issue 18, item 3) between two real agents' handlers and node caches on
loopback, the store being ``tests/hostile_s3.py``: what one node fetched, another copies from
it without the store, verified; and nobody without the token gets a byte.

The daemon's part (who copies what, and the token) runs on a real cluster in
test_cache_cluster.py; here the two handlers are called as the daemon calls them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile_s3 import HostileS3  # tests/: on sys.path, above the integration package

from hpcstage.agent import calls, direct, stagein
from hpcstage.agent.context import DEFAULT_CACHE, DEFAULT_TRANSFER, NodeContext
from hpcstage.cache import NodeCache
from hpcstage.cache.layout import object_path
from hpcstage.core.directives import SourceKind
from hpcstage.errors import HpcstageError
from hpcstage.protocol.messages import (
    NO_LIMITS,
    AgentStoreSettings,
    HelloRequest,
    PeerFetchRequest,
    PeerObject,
    PeerServeRequest,
    SourceSpec,
    StageItem,
    StageRequest,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

B = "b"
KEY = "big/blob.bin"
SOURCE = SourceSpec(SourceKind.S3_OBJECT, B, KEY, "", [], [], "")
LOOPBACK = "127.0.0.1"


@pytest.fixture
async def s3() -> AsyncIterator[HostileS3]:
    server = HostileS3()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _agent(root: Path, endpoint: str, name: str) -> NodeContext:
    ctx = NodeContext(node=name, cache=NodeCache(root))
    store = AgentStoreSettings(
        endpoint_url=endpoint,
        region="us-east-1",
        addressing_style="path",
        verify_tls=True,
        ca_bundle="",
        max_connections=16,
        connect_timeout=5.0,
        read_timeout=30.0,
        credentials={"access_key": "x", "secret_key": "y", "token": ""},
    )
    transfer = dataclasses.replace(DEFAULT_TRANSFER, retries=1, backoff_base=0.01)
    await calls.hello(ctx, HelloRequest(store, transfer, DEFAULT_CACHE, None))
    return ctx


@dataclass
class Pair:
    """Two nodes: ``holder`` has staged the object from the store, ``receiver`` has not."""

    holder: NodeContext
    receiver: NodeContext
    body: bytes
    row: PeerObject


@pytest.fixture
async def pair(tmp_path: Path, s3: HostileS3) -> AsyncIterator[Pair]:
    body = os.urandom(3 << 20) + b"tail"  # above 1 MiB: node to node, one plain-MD5 GET
    s3.put(B, KEY, body)
    holder = await _agent(tmp_path / "n1", s3.endpoint, "n1")
    receiver = await _agent(tmp_path / "n2", s3.endpoint, "n2")
    item = StageItem(1, SOURCE, "data", None, "", None, "")
    await stagein.stage(
        holder, StageRequest("", "", view=False, items=[item], rates=NO_LIMITS), lambda _: None
    )
    assert s3.gets(KEY) == 1
    rows, _ = holder.cache.holdings(holder.stores.s3(B).store_id, B, KEY, "", 10)
    (r,) = rows
    try:
        yield Pair(holder, receiver, body, PeerObject(r.cache_id, r.key, r.etag, r.size, r.sha256))
    finally:
        for ctx in (holder, receiver):
            await ctx.stores.close()
            ctx.cache.close()


def _secrets() -> tuple[str, str]:
    return secrets.token_hex(32), secrets.token_hex(32)


async def _offer(pair: Pair, token: str, proof: str, ttl: float = 60.0) -> int:
    request = PeerServeRequest([pair.row.cache_id], LOOPBACK, token, proof, ttl)
    reply = await direct.peer_serve(pair.holder, request)
    assert reply.objects == [pair.row]
    return reply.port


async def _fetch(pair: Pair, port: int, token: str, proof: str) -> tuple[int, int]:
    request = PeerFetchRequest(SOURCE, LOOPBACK, port, token, proof, [pair.row])
    got = await direct.peer_fetch(pair.receiver, request)
    return got.objects, got.refused


def _cached(ctx: NodeContext, cache_id: str) -> bytes | None:
    if ctx.cache.indexed(cache_id) is None:
        return None
    return object_path(ctx.cache.objects, cache_id).read_bytes()


async def _ask(port: int, line: bytes) -> bytes:
    """What a connection to the listener that sends ``line`` gets back (all of it)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(line)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


async def test_a_big_object_is_copied_node_to_node_verified_and_durable(
    pair: Pair, s3: HostileS3
) -> None:
    token, proof = _secrets()
    port = await _offer(pair, token, proof)
    assert await _fetch(pair, port, token, proof) == (1, 0)
    assert _cached(pair.receiver, pair.row.cache_id) == pair.body
    assert s3.gets(KEY) == 1, "the receiver asked the store"
    stats = pair.receiver.cache.stats
    assert (stats.peer_objects, stats.peer_bytes, stats.fetched_objects) == (1, len(pair.body), 0)
    # Committed like a download: the SHA-256 of the bytes is on record, and it is made durable.
    row = pair.receiver.cache.indexed(pair.row.cache_id)
    assert row is not None and row.sha256 == hashlib.sha256(pair.body).hexdigest()
    assert pair.receiver.cache.wait_durable(30)


async def test_the_listener_gives_nothing_without_the_token_and_serves_each_object_once(
    pair: Pair,
) -> None:
    token, proof = _secrets()
    port = await _offer(pair, token, proof)
    cache_id = pair.row.cache_id
    assert await _ask(port, b"\n") == b""
    assert await _ask(port, f"HPCSTAGE-PEER/1 {cache_id}\n".encode()) == b""
    assert await _ask(port, f"HPCSTAGE-PEER/1 {'0' * 64} {cache_id}\n".encode()) == b""
    assert await _ask(port, f"HPCSTAGE-PEER/1 {token[:-1]}x {cache_id}\n".encode()) == b""
    assert await _ask(port, f"HPCSTAGE-PEER/1 {token} {'a' * 64}\n".encode()) == b""
    assert await _ask(port, b"GET / HTTP/1.1\r\n" + b"x" * 70000) == b""
    # None of that used the offer up: the receiver still gets its object...
    assert await _fetch(pair, port, token, proof) == (1, 0)
    # ...once: the token is spent, and the listener closed with its last object served.
    with pytest.raises(ConnectionRefusedError):
        await _ask(port, f"HPCSTAGE-PEER/1 {token} {cache_id}\n".encode())


async def test_a_listener_stops_accepting_after_its_ttl(pair: Pair) -> None:
    token, proof = _secrets()
    port = await _offer(pair, token, proof, ttl=1.0)
    await asyncio.sleep(3)
    assert await _fetch(pair, port, token, proof) == (0, 1)
    assert _cached(pair.receiver, pair.row.cache_id) is None


async def test_connections_without_the_token_do_not_keep_a_listener_open(pair: Pair) -> None:
    token, proof = _secrets()
    port = await _offer(pair, token, proof, ttl=1.0)
    answers = []
    for _ in range(10):  # 3 s of knocking, every 0.3 s: never 1 s idle
        try:
            answers.append(await _ask(port, f"HPCSTAGE-PEER/1 {'0' * 64} x\n".encode()))
        except ConnectionRefusedError:
            answers.append(None)
        await asyncio.sleep(0.3)
    assert set(answers) == {b"", None} and answers[-1] is None, answers
    assert await _fetch(pair, port, token, proof) == (0, 1)


async def test_a_listener_that_does_not_know_the_proof_is_not_believed(pair: Pair) -> None:
    token, proof = _secrets()
    port = await _offer(pair, token, proof)
    assert await _fetch(pair, port, token, secrets.token_hex(32)) == (0, 1)
    assert _cached(pair.receiver, pair.row.cache_id) is None
    assert pair.receiver.cache.stats.peer_refused == 1


async def test_bytes_that_went_bad_on_the_peer_are_refused_and_nothing_is_kept(
    pair: Pair,
) -> None:
    # The holder's disk returns one wrong byte: its own hash of what it sends agrees, the
    # object's MD5 (its ETag) does not.
    path = object_path(pair.holder.cache.objects, pair.row.cache_id)
    path.chmod(0o600)
    with open(path, "r+b") as file:
        file.seek(2 << 20)
        file.write(b"\x00" if file.read(1) != b"\x00" else b"\x01")
    token, proof = _secrets()
    port = await _offer(pair, token, proof)
    assert await _fetch(pair, port, token, proof) == (0, 1)
    assert _cached(pair.receiver, pair.row.cache_id) is None
    leftovers = [p for p in pair.receiver.cache.objects.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers


async def test_weak_secrets_are_refused(pair: Pair) -> None:
    with pytest.raises(HpcstageError, match="64 hex digits"):
        await direct.peer_serve(
            pair.holder, PeerServeRequest([pair.row.cache_id], LOOPBACK, "abc", "def", 60)
        )

"""Peer copy: what a cache offers a peer, how a node checks what a peer sent, and a copy
between two real node caches through the agent's message handling (no cluster)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpcstage.agent import peer
from hpcstage.agent.context import NodeContext
from hpcstage.agent.server import routes
from hpcstage.cache import NodeCache
from hpcstage.core.filters import KeyFilter
from hpcstage.core.identity import ObjectRef
from hpcstage.errors import ProtocolError
from hpcstage.protocol.framing import ProgressFn
from hpcstage.protocol.messages import (
    AgentStoreSettings,
    PeerObject,
    PeerPutRequest,
    PeerSent,
    SourceSpec,
)
from hpcstage.protocol.wire import from_wire, to_wire
from hpcstage.staging import peer as peer_copy
from hpcstage.staging.agents import AgentClient

STORE = "https://s3.example"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[NodeCache]:
    with NodeCache(tmp_path / "cache", clock=Clock()) as node_cache:
        yield node_cache


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def put(cache: NodeCache, key: str, data: bytes, bucket: str = "b", etag: str = "") -> ObjectRef:
    ref = ObjectRef(STORE, bucket, key, etag or md5(data), len(data))
    pending = cache.begin(ref)
    view = memoryview(data)
    while view:
        view = view[os.write(pending.fd, view) :]
    cache.commit(pending, hashlib.sha256(data).hexdigest())
    return ref


def all_pages(cache: NodeCache, prefix: str, limit: int) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    after = ""
    while True:
        rows, after = cache.holdings(STORE, "b", prefix, after, limit)
        seen += [(r.key, r.etag) for r in rows]
        if not after:
            return seen


def test_holdings_are_the_keys_under_the_prefix_newest_version_first(cache: NodeCache) -> None:
    for i in range(7):
        put(cache, f"p/{i}", b"x%d" % i)
    old = put(cache, "p/3", b"old three")
    new = put(cache, "p/3", b"new three")  # created later: the one offered
    put(cache, "p2/x", b"not under p/")
    put(cache, "p", b"the key p itself")
    put(cache, "p/0", b"other bucket", bucket="c")
    for limit in (1, 2, 3, 1000):  # every page boundary, also inside a key's versions
        seen = all_pages(cache, "p/", limit)
        assert [k for k, _ in seen] == [f"p/{i}" for i in range(7)], limit
        assert dict(seen)["p/3"] == new.etag != old.etag


def test_holdings_of_an_empty_cache_end_at_once(cache: NodeCache) -> None:
    assert cache.holdings(STORE, "b", "p/", "", 10) == ([], "")


def test_read_object_gives_indexed_bytes_only(cache: NodeCache) -> None:
    ref = put(cache, "p/a", b"hello")
    found = cache.read_object(ref.cache_id, 1024)
    assert found is not None and found[1] == b"hello" and found[0].key == "p/a"
    assert cache.read_object(ref.cache_id, 4) is None  # bigger than asked for
    assert cache.read_object("0" * 64, 1024) is None  # not held
    path = cache.lookup(ref)
    assert path is not None
    path.chmod(0o644)
    path.write_bytes(b"hell")  # truncated behind the cache's back
    assert cache.read_object(ref.cache_id, 1024) is None
    assert cache.held([ref.cache_id, "1" * 64]) == {ref.cache_id}


def entry(key: str, body: bytes, etag: str = "", **over: Any) -> PeerSent:
    ref = ObjectRef(STORE, "b", key, etag or md5(body), len(body))
    sent = PeerSent(
        cache_id=ref.cache_id,
        key=key,
        etag=ref.etag,
        size=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        data=base64.b64encode(body).decode(),
    )
    return dataclasses.replace(sent, **over)


def check(
    e: PeerSent, prefix: str = "p/", exact: bool = False, key_filter: KeyFilter | None = None
) -> ObjectRef | None:
    scope = peer.Scope(STORE, "b", prefix, exact, key_filter or KeyFilter())
    got = peer._checked(e, scope)
    return None if got is None else got[0]


def test_a_filtered_out_object_is_never_taken_from_a_peer() -> None:
    only_nc = KeyFilter(include=("**/*.nc",), exclude=("tmp/**",))
    assert check(entry("p/d/a.nc", b"data"), key_filter=only_nc) is not None
    assert check(entry("p/a.txt", b"data"), key_filter=only_nc) is None
    assert check(entry("p/tmp/a.nc", b"data"), key_filter=only_nc) is None


def test_a_pinned_version_is_no_peer_copy_source() -> None:
    spec = SourceSpec.of("s3://bkt/k?versionId=v1")
    assert spec.version_id == "v1" and not peer_copy.copyable(spec)
    assert peer_copy.copyable(SourceSpec.of("s3://bkt/k"))


def test_a_good_copy_is_taken() -> None:
    ref = check(entry("p/a", b"data"))
    assert ref is not None and ref.key == "p/a" and ref.size == 4
    assert check(entry("p", b"x"), prefix="p", exact=True) is not None
    # A multipart ETag is no MD5 of the bytes: the SHA-256 the peer recorded decides.
    assert check(entry("p/m", b"multi", etag="abc-2")) is not None


@pytest.mark.parametrize(
    "bad",
    [
        entry("p/a", b"data", cache_id="f" * 64),  # not the cache id of its identity
        entry("q/a", b"data"),  # not under the source
        entry("p/a", b"data", size=5),  # size other than the bytes
        entry("p/a", b"data", sha256=hashlib.sha256(b"other").hexdigest()),
        entry("p/a", b"data", sha256="not-a-digest"),
        entry("p/a", b"data", data=base64.b64encode(b"dat!").decode()),  # bytes changed
        entry("p/a", b"data", data="not base64!"),
        entry("p/a", b"data", etag=md5(b"other")),  # MD5 ETag the bytes do not have
        dataclasses.replace(entry("p/a", b"data"), etag=""),  # no ETag
        entry("p/big", b"z" * (peer.PEER_MAX + 1)),  # bigger than peers copy
    ],
)
def test_anything_else_is_refused(bad: PeerSent) -> None:
    assert check(bad) is None


@pytest.mark.parametrize(
    "malformed",
    [
        "not an object",
        {k: v for k, v in to_wire(entry("p/a", b"data")).items() if k != "data"},
        {**to_wire(entry("p/a", b"data")), "size": "4"},
        {**to_wire(entry("p/a", b"data")), "extra": 1},
    ],
)
def test_a_malformed_object_is_refused_before_any_check(malformed: Any) -> None:
    source = to_wire(SourceSpec.of("s3://data/p/"))
    with pytest.raises(ProtocolError):
        from_wire(PeerPutRequest, {"source": source, "objects": [malformed]})


def test_an_exact_key_source_takes_that_key_only() -> None:
    assert check(entry("p.bak", b"x"), prefix="p", exact=True) is None


def row(size: int) -> PeerObject:
    return PeerObject("id", "k", "e", size, "s")


def test_batches_hold_at_most_batch_bytes_unless_one_object_is_bigger() -> None:
    third = peer_copy.BATCH_BYTES // 6
    rows = [row(n * third) for n in (3, 3, 3, 10, 1)]
    sizes = [[r.size for r in b] for b in peer_copy._batches(rows)]
    # In order; a batch closes before it would pass the limit; a bigger object goes alone.
    assert sizes == [[3 * third, 3 * third], [3 * third], [10 * third], [third]]


def test_within_stops_at_the_budget() -> None:
    rows = [row(4) for _ in range(3)]
    assert len(peer_copy._within(rows, 9)) == 2
    assert peer_copy._within(rows, 3) == []


# -- a copy between two node caches, through the agent's routing and strict decoding ----------


@dataclasses.dataclass
class Loopback:
    """An agent session without the process: JSON both ways, the agent's own routing."""

    ctx: NodeContext

    async def call(
        self, op: str, params: dict[str, Any], on_progress: ProgressFn | None = None
    ) -> dict[str, Any]:
        handler = routes(self.ctx)[op]
        reply = await handler(json.loads(json.dumps(params)), on_progress or (lambda _: None))
        decoded: dict[str, Any] = json.loads(json.dumps(reply))
        return decoded


def node(tmp_path: Path, name: str) -> NodeContext:
    ctx = NodeContext(name, NodeCache(tmp_path / name, clock=Clock()))
    ctx.stores.settings = AgentStoreSettings(
        STORE, "us-east-1", "path", True, "", 4, 1.0, 1.0, {"access_key": "a", "secret_key": "s"}
    )
    return ctx


def _copy(
    a: NodeContext, b: NodeContext, source: SourceSpec, route: peer_copy.Route
) -> peer_copy.PeerCopy:
    """``b`` copies from ``a`` as the daemon has it do, over loopback sessions."""

    async def copy() -> peer_copy.PeerCopy:
        try:
            return await peer_copy.copy_from_peer(
                AgentClient(Loopback(b), "b"), AgentClient(Loopback(a), "a"), source, route
            )
        finally:
            await a.stores.close()
            await b.stores.close()

    return asyncio.run(copy())


BOTH_WAYS = peer_copy.Route(relay=True, direct_host="127.0.0.1")


@pytest.mark.parametrize("src", ["s3://data/p/one.dat", "s3://data/p/"])
def test_a_single_object_source_is_copied_from_a_peer_like_a_prefix(
    tmp_path: Path, src: str
) -> None:
    """Issue 16: the daemon and the agent tested for a source kind "s3-key" that the directive
    parser never makes ("s3-object"), so a single-object input never came from a peer."""
    source = SourceSpec.of(src)
    assert peer_copy.copyable(source)
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    put(a.cache, "p/one.dat", b"one", bucket="data")
    put(a.cache, "p/other.dat", b"other", bucket="data")
    copied = _copy(a, b, source, BOTH_WAYS)
    wanted = 1 if src.endswith(".dat") else 2
    assert (copied.objects, copied.refused) == (wanted, 0)
    assert b.cache.stats.peer_objects == wanted
    assert b.cache.lookup(ObjectRef(STORE, "data", "p/one.dat", md5(b"one"), 3)) is not None
    a.cache.close()
    b.cache.close()


BIG = os.urandom(peer.PEER_MAX) + b"one more byte than the relay takes"


@pytest.mark.parametrize(
    ("route", "copied"),
    [
        (BOTH_WAYS, {"p/small", "p/big"}),
        (peer_copy.Route(relay=False, direct_host="127.0.0.1"), {"p/big"}),
        (peer_copy.Route(relay=True, direct_host=""), {"p/small"}),
        # A running job's top-up: small objects node to node too, no relay needed.
        (
            peer_copy.Route(relay=False, direct_host="127.0.0.1", small_direct=True),
            {"p/small", "p/big"},
        ),
        # Without an address to copy node to node, small_direct changes nothing.
        (peer_copy.Route(relay=False, direct_host="", small_direct=True), set()),
    ],
)
def test_small_objects_go_through_the_daemon_and_big_ones_node_to_node(
    tmp_path: Path, route: peer_copy.Route, copied: set[str]
) -> None:
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    refs = {
        "p/small": put(a.cache, "p/small", b"small", "data"),
        "p/big": put(a.cache, "p/big", BIG, "data"),
    }
    got = _copy(a, b, SourceSpec.of("s3://data/p/"), route)
    assert (got.objects, got.refused) == (len(copied), 0)
    assert {k for k, ref in refs.items() if b.cache.lookup(ref) is not None} == copied
    if "p/big" in copied:
        path = b.cache.lookup(refs["p/big"])
        assert path is not None and path.read_bytes() == BIG
    assert b.cache.stats.peer_bytes == sum(refs[k].size for k in copied)
    a.cache.close()
    b.cache.close()


def test_a_running_jobs_small_objects_never_cross_the_daemon(tmp_path: Path) -> None:
    """Issue 18: a top-up of a job waiting at `hpcstage env` copies its many small files node
    to node, not in base64 batches through the daemon's two relays."""
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    refs = [put(a.cache, f"p/f{i:03}", os.urandom(1000 + i), "data") for i in range(40)]
    relayed: list[str] = []

    class NoRelay(Loopback):
        async def call(
            self, op: str, params: dict[str, Any], on_progress: ProgressFn | None = None
        ) -> dict[str, Any]:
            relayed.extend([op] if op in ("peer_read", "peer_put") else [])
            return await super().call(op, params, on_progress)

    async def copy() -> peer_copy.PeerCopy:
        try:
            return await peer_copy.copy_from_peer(
                AgentClient(NoRelay(b), "b"),
                AgentClient(NoRelay(a), "a"),
                SourceSpec.of("s3://data/p/"),
                peer_copy.Route(relay=True, direct_host="127.0.0.1", small_direct=True),
            )
        finally:
            await a.stores.close()
            await b.stores.close()

    got = asyncio.run(copy())
    assert (got.objects, got.refused, relayed) == (40, 0, [])
    assert all(b.cache.lookup(ref) is not None for ref in refs)
    a.cache.close()
    b.cache.close()


def test_peer_copy_refuses_a_shared_path() -> None:
    assert not peer_copy.copyable(SourceSpec.of("/shared/data/"))

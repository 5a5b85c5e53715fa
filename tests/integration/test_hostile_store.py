"""A hostile S3 server against the real agent path (issue 6, item 6).

Each case stages ``s3://b/p/`` (a few good objects and one hostile thing) through
``calls.hello`` + ``stagein.stage`` into a real ``NodeCache``, served by ``tests/hostile_s3.py`` on
loopback, and checks three things:

clear error
    ``stage`` raises an HpcstageError whose one-line message names the object (or the listing)
    and the problem: no raw botocore/aiohttp exception, no traceback, no control character.
nothing partial
    no temp file in ``objects/``; every object file is indexed, has its indexed size and
    SHA-256 and holds exactly the bytes the store listed (never a truncated, corrupted or
    changed version); every file in the job view is a hardlink of such an object; nothing
    exists outside the cache directory (``p/../../etc/x`` creates no ``etc/x`` anywhere); an
    agent restarted on the cache (``hello`` runs ``reconcile``) finds nothing to clean up.
nothing lost
    By design the whole request fails on its first bad object or page (a job never starts
    with part of its inputs). The good objects fetched before that stay in the cache,
    verified; once the store is healed the same request succeeds, fetching only what was
    missing: no good object is ever fetched twice.

The tests marked ``needs_agent_fix`` describe behaviour that needs one change in
``hpcstage/agent/stagein.py`` (``_view_path`` must call ``hpcstage.cache.key_dest``): they are
strict xfails, so they start failing, as a reminder to drop the marker, once it is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hostile_s3 import (  # tests/: on sys.path, above the integration package
    HostileS3,
    ListMode,
    Mode,
)

from hpcstage.agent import calls, stagein
from hpcstage.agent.context import DEFAULT_CACHE, DEFAULT_TRANSFER, NodeContext
from hpcstage.cache import NodeCache, key_dest
from hpcstage.core.directives import SourceKind
from hpcstage.errors import (
    CacheError,
    HpcstageError,
    ObjectChangedError,
    StoreError,
    TransientStoreError,
)
from hpcstage.protocol.messages import (
    NO_LIMITS,
    AgentStoreSettings,
    EvictRequest,
    HelloRequest,
    SourceSpec,
    StageItem,
    StageRequest,
)
from hpcstage.protocol.wire import to_wire

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

B = "b"
JOB = "1"
GOOD = {f"p/good{i}": hashlib.sha256(bytes([i])).digest() * (40 + i) for i in range(6)}
BAD = "p/bad"
BAD_DATA = b"hostile-bytes " * 100  # 1400 bytes: a plain-MD5 ETag, one GET
# released/: views of released jobs whose jobs left something undeletable (cache/layout.py)
# What a cache holds at its top (cache/layout.py; packed/: packed datasets' trees, cache/trees.py).
LAYOUT = {"objects", "jobs", "released", "packed", "index.db", "index.db-wal", "index.db-shm"}
VENDOR_NAMES = re.compile(r"botocore|aiohttp|ClientPayloadError|Traceback|KeyError|ValueError")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@pytest.fixture
async def s3() -> AsyncIterator[HostileS3]:
    server = HostileS3()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@dataclass
class Node:
    """One node's agent and cache directory; ``restart`` is a new agent on the same cache."""

    root: Path
    endpoint: str
    agent: NodeContext | None = None

    async def start(self) -> dict[str, Any]:
        self.agent = NodeContext(node="n1", cache=NodeCache(self.root))
        store = AgentStoreSettings(
            endpoint_url=self.endpoint,
            region="us-east-1",
            addressing_style="path",
            verify_tls=True,
            ca_bundle="",
            max_connections=128,
            connect_timeout=1.0,
            read_timeout=0.5,  # a stalled body is given up quickly
            credentials={"access_key": "x", "secret_key": "y", "token": ""},
        )
        transfer = dataclasses.replace(
            DEFAULT_TRANSFER, retries=1, backoff_base=0.01, backoff_max=0.05, concurrency=4
        )
        reply = await calls.hello(self.agent, HelloRequest(store, transfer, DEFAULT_CACHE, None))
        return dict(to_wire(reply))

    async def stage(
        self, key: str = "p/", kind: SourceKind = SourceKind.S3_PREFIX, job: str = ""
    ) -> dict[str, Any]:
        """The reply as the daemon gets it; ``job``: a warmup's (no view)."""
        assert self.agent is not None
        source = SourceSpec(kind, B, key, "", [], [], "")
        item = StageItem(1, source, "data", None, "", None, "")
        request = StageRequest(job or JOB, "", view=not job, items=[item], rates=NO_LIMITS)
        return dict(to_wire(await stagein.stage(self.agent, request, lambda _: None)))

    async def settle(self) -> None:
        """Wait for downloads that outlive a failed request (singleflight shields them)."""
        assert self.agent is not None
        inflight = self.agent.cache._inflight
        while inflight:
            await asyncio.gather(*inflight.values(), return_exceptions=True)

    async def stop(self) -> None:
        if self.agent is not None:
            await self.settle()
            await self.agent.stores.close()
            self.agent.cache.close()
            self.agent = None

    async def restart(self) -> dict[str, Any]:
        await self.stop()
        return await self.start()


@pytest.fixture
async def node(tmp_path: Path, s3: HostileS3) -> AsyncIterator[Node]:
    # The cache is the only thing in tmp_path/node: anything else there escaped it.
    node = Node(tmp_path / "node" / "cache", s3.endpoint)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def put_good(s3: HostileS3) -> None:
    for key, data in GOOD.items():
        s3.put(B, key, data)


def indexed(root: Path) -> dict[str, tuple[str, int, str]]:
    """cache_id -> (key, size, sha256), read from the index as another process would."""
    # closing(): a connection's own "with" ends a transaction, it does not close.
    with contextlib.closing(sqlite3.connect(f"file:{root / 'index.db'}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT cache_id, key, size, sha256 FROM objects").fetchall()
    return {cache_id: (key, size, sha256) for cache_id, key, size, sha256 in rows}


def check_clean(node: Node, s3: HostileS3, gone: dict[str, bytes] | None = None) -> dict[str, str]:
    """Assert nothing partial or escaped is in the cache; return {view path: key} linked.

    ``gone`` holds the listed bytes of objects deleted from the store since.
    """
    listed = {key: obj.data for key, obj in s3.objects[B].items()} | (gone or {})
    root = node.root
    assert sorted(p.name for p in root.parent.iterdir()) == ["cache"], "something escaped"
    assert {p.name for p in root.iterdir()} <= LAYOUT
    rows = indexed(root)
    inodes: dict[int, str] = {}
    for path in (root / "objects").rglob("*"):
        if path.is_dir():
            continue
        assert ".tmp-" not in path.name, f"temp file left: {path.name}"
        assert path.name in rows, f"unindexed object file {path.name}"
        key, size, sha256 = rows[path.name]
        data = path.read_bytes()
        assert len(data) == size
        assert hashlib.sha256(data).hexdigest() == sha256
        # Exactly what was listed: never a truncated, corrupted or changed version.
        assert data == listed[key], f"{key}: the cache holds other bytes"
        inodes[path.stat().st_ino] = key
    assert len(inodes) == len(rows), "an index row names no file"
    linked: dict[str, str] = {}
    view = root / "jobs" / JOB
    for directory, dirs, files in os.walk(view):
        for name in dirs + files:
            path = Path(directory, name)
            assert not path.is_symlink()
            assert path.resolve().is_relative_to(view.resolve())
        for name in files:
            path = Path(directory, name)
            assert path.stat().st_ino in inodes, f"{path} is not a cached object"
            linked[str(path.relative_to(view))] = inodes[path.stat().st_ino]
    return linked


async def check_restart_is_clean(node: Node) -> set[str]:
    """A new agent on the cache finds nothing to clean up; return the cached keys."""
    before = indexed(node.root)
    report = (await node.restart())["reconcile"]
    assert (report["temps_removed"], report["rows_dropped"], report["orphans_removed"]) == (0, 0, 0)
    assert report["objects"] == len(before)
    return {key for key, _, _ in before.values()}


def _by_mode(cases: list[tuple[Any, ...]]) -> list[Any]:
    """Parameters with the mode as the test id."""
    return [pytest.param(*case, id=str(case[0])) for case in cases]


def check_message(exc: BaseException, *fragments: str) -> str:
    message = str(exc)
    assert isinstance(exc, HpcstageError), f"{type(exc).__name__}: {message}"
    for fragment in fragments:
        assert re.search(fragment, message), f"{fragment!r} not in {message!r}"
    assert not VENDOR_NAMES.search(message), message
    assert not CONTROL.search(message), message
    assert len(message) < 500
    return message


async def check_heals(
    node: Node, s3: HostileS3, cached: set[str], gone: dict[str, bytes] | None = None
) -> None:
    """The same request succeeds once the store behaves; nothing good is fetched twice."""
    result = (await node.stage())["items"][0]
    listed = set(s3.objects[B])
    assert result["files_done"] == len(listed)
    assert result["fetched"] == len(listed - cached)
    linked = check_clean(node, s3, gone)
    assert linked == {f"data/{key.removeprefix('p/')}": key for key in listed}
    for key in GOOD:
        assert s3.gets(key) == 1, f"{key} fetched {s3.gets(key)} times"


# --- hostile bodies and headers -------------------------------------------------------------

URL = re.escape(f"s3://{B}/{BAD}")
OBJECT_CASES = [
    (Mode.TRUNCATE, TransientStoreError, [rf"get {URL}: truncated: the connection ended"]),
    (Mode.STALL, TransientStoreError, [rf"get {URL}: the store stopped answering"]),
    (Mode.SHORT_LENGTH, TransientStoreError, [rf"get {URL}: truncated: .*announced 700 bytes"]),
    (Mode.LONG_LENGTH, TransientStoreError, [rf"get {URL}: .*announced 2400 .*listed with 1400"]),
    (Mode.EXTRA_BYTES, TransientStoreError, [rf"get {URL}: .*announced 5496 .*listed with 1400"]),
    (Mode.ENDLESS, TransientStoreError, [rf"get {URL}: the store sent more than the 1400 bytes"]),
    (Mode.WRONG_ETAG, ObjectChangedError, [rf"get {URL}: the object changed since it was listed"]),
    (Mode.BAD_MD5, TransientStoreError, [rf"{URL}: checksum mismatch"]),
    (Mode.CHANGES, ObjectChangedError, [rf"get {URL}: the object changed since it was listed"]),
]


@pytest.mark.parametrize(("mode", "kind", "fragments"), _by_mode(OBJECT_CASES))
async def test_hostile_object_fails_the_request_cleanly(
    node: Node, s3: HostileS3, mode: Mode, kind: type[StoreError], fragments: list[str]
) -> None:
    put_good(s3)
    bad = s3.put(B, BAD, BAD_DATA, mode)
    with pytest.raises(kind) as info:
        await node.stage()
    assert type(info.value) is kind  # permanent failures must not pass for transient ones
    check_message(info.value, *fragments)
    await node.settle()
    linked = check_clean(node, s3)
    assert BAD not in linked.values()
    cached = await check_restart_is_clean(node)
    assert BAD not in cached
    bad.mode = Mode.OK
    await check_heals(node, s3, cached)


async def test_the_agent_counts_its_retries_for_the_daemons_metrics(
    node: Node, s3: HostileS3
) -> None:
    s3.put(B, BAD, BAD_DATA, Mode.TRUNCATE)
    with pytest.raises(TransientStoreError):
        await node.stage(BAD, kind=SourceKind.S3_OBJECT)
    await node.settle()
    assert node.agent is not None
    policy = EvictRequest(max_bytes=1 << 30, high=0.9, low=0.8, ttl=0, max_objects=0)
    reply = await calls.evict(node.agent, policy)
    # retries = 1 in this agent's hello: the truncated GET was tried twice, retried once;
    # each time the lean GET's read was cut short and it handed the GET to the SDK (which
    # failed too).
    assert (reply.retries, reply.fallbacks) == (1, 2), reply
    assert reply.since <= time.time()
    await node.agent.stores.close()  # new settings or credentials: clients go, counts stay
    assert node.agent.stores.fallbacks() == 2


async def test_hostile_single_object_leaves_no_file_at_its_dest(node: Node, s3: HostileS3) -> None:
    bad = s3.put(B, BAD, BAD_DATA, Mode.TRUNCATE)
    with pytest.raises(TransientStoreError) as info:
        await node.stage(BAD, kind=SourceKind.S3_OBJECT)
    check_message(info.value, rf"get {URL}: truncated")
    await node.settle()
    assert check_clean(node, s3) == {}
    assert await check_restart_is_clean(node) == set()
    bad.mode = Mode.OK
    result = (await node.stage(BAD, kind=SourceKind.S3_OBJECT))["items"][0]
    assert (result["files_done"], result["fetched"]) == (1, 1)
    assert check_clean(node, s3) == {"data": BAD}


@pytest.mark.parametrize("mode", [Mode.ENDLESS, Mode.EXTRA_BYTES], ids=str)
async def test_a_longer_body_never_reaches_the_disk(
    node: Node, s3: HostileS3, tmp_path: Path, mode: Mode
) -> None:
    """The store stops at the listed size: a server sending 8 MiB for 1400 bytes fills no disk."""
    s3.put(B, BAD, BAD_DATA, mode)
    assert node.agent is not None
    store = node.agent.stores.s3(B)  # the agent's own client for the bucket
    [ref] = [ref async for ref in store.list("p/")]  # as listed: 1400 bytes
    target = tmp_path / "target"
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(TransientStoreError, match=r"more than the 1400 bytes|announced 5496"):
            await store.download(ref, fd)
        assert os.fstat(fd).st_size <= len(BAD_DATA)
    finally:
        os.close(fd)


# --- hostile listings -------------------------------------------------------------------------

LIST = re.escape(f"list s3://{B}/p/")
LIST_CASES = [
    (ListMode.MALFORMED_XML, TransientStoreError, [rf"{LIST}: HTTP 500 without an S3 answer"]),
    (ListMode.NOT_XML, StoreError, [rf"{LIST}: the store's answer is not a listing"]),
    (ListMode.BAD_SIZE, StoreError, [rf"{LIST}: the store sent a malformed response", "lots"]),
    (ListMode.NEGATIVE_SIZE, StoreError, [rf"{LIST}: .*s3://b/p/good\d the size -5"]),
    (ListMode.NO_KEY, StoreError, [rf"{LIST}: the store sent a malformed response.*Key"]),
    (ListMode.NO_ETAG, StoreError, [rf"{LIST}: .*s3://b/p/good\d no ETag"]),
    (ListMode.OUTSIDE_PREFIX, StoreError, [rf"{LIST}: the store listed s3://b//etc/passwd"]),
    (ListMode.LOOP, StoreError, [rf"{LIST}: the store's listing goes round in circles"]),
    (ListMode.SERVER_ERROR, TransientStoreError, [rf"{LIST}: InternalError"]),
]


@pytest.mark.parametrize(("mode", "kind", "fragments"), _by_mode(LIST_CASES))
async def test_hostile_listing_fails_the_request_cleanly(
    node: Node, s3: HostileS3, mode: ListMode, kind: type[StoreError], fragments: list[str]
) -> None:
    put_good(s3)
    s3.list_mode[B] = mode
    with pytest.raises(kind) as info:
        await node.stage()
    assert type(info.value) is kind  # permanent failures must not pass for transient ones
    check_message(info.value, *fragments)
    await node.settle()
    linked = check_clean(node, s3)
    assert "etc/passwd" not in str(linked)
    cached = await check_restart_is_clean(node)
    s3.list_mode[B] = ListMode.OK
    await check_heals(node, s3, cached)


# --- hostile keys -----------------------------------------------------------------------------

KEY_CASES = [
    ("p/../../etc/x", r"\.\./\.\./etc/x'.*(not a relative path|'\.\.' path component)"),
    ("p/a/../../../x", r"a/\.\./\.\./\.\./x'.*(not a relative path|'\.\.' path component)"),
    ("p/a\x1bb", r"a\\x1bb'.*control character '\\x1b'"),
    ("p/a\nb", r"a\\nb'.*control character '\\n'"),
    ("p/a\rb", r"a\\rb'.*control character '\\r'"),
    ("p/a\x00b", r"a\\x00b'.*control character '\\x00'"),
]


@pytest.mark.parametrize(("key", "fragment"), KEY_CASES, ids=repr)
async def test_hostile_key_is_refused_and_nothing_escapes(
    node: Node, s3: HostileS3, key: str, fragment: str
) -> None:
    put_good(s3)
    s3.put(B, key, BAD_DATA)
    with pytest.raises(CacheError) as info:
        await node.stage()
    check_message(info.value, fragment)
    await node.settle()
    linked = check_clean(node, s3)  # also: nothing outside the cache, nothing outside the view
    assert key not in linked.values()
    cached = await check_restart_is_clean(node)
    gone = {key: s3.objects[B].pop(key).data}
    await check_heals(node, s3, cached, gone)


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        # Each would silently replace p/a/x in the view today (PurePosixPath folds them).
        ("p/a//x", "an empty path component"),
        ("p/a/./x", "'.' path component"),
        ("p//a/x", "starts with '/'"),
    ],
    ids=repr,
)
async def test_keys_that_fold_onto_another_are_refused(
    node: Node, s3: HostileS3, key: str, fragment: str
) -> None:
    s3.put(B, "p/a/x", b"the real x")
    s3.put(B, key, BAD_DATA)
    with pytest.raises(CacheError) as info:
        await node.stage()
    check_message(info.value, re.escape(repr(key)), fragment)
    await node.settle()
    x = node.root / "jobs" / JOB / "data" / "a" / "x"
    assert not x.exists() or x.read_bytes() == b"the real x"


async def test_leading_slash_key_in_a_whole_bucket_is_refused(node: Node, s3: HostileS3) -> None:
    s3.put(B, "etc/x", b"the real etc/x")
    s3.put(B, "/etc/x", BAD_DATA)  # folded onto etc/x by the view path today
    with pytest.raises(CacheError) as info:
        await node.stage("")
    check_message(info.value, "'/etc/x'", "starts with '/'")


@pytest.mark.parametrize("key", ["p/../../etc/x", "p/a\x1bb"], ids=repr)
async def test_hostile_key_is_refused_before_any_byte_is_fetched(
    node: Node, s3: HostileS3, key: str
) -> None:
    s3.put(B, key, BAD_DATA)
    with pytest.raises(CacheError, match="object key"):
        await node.stage()
    await node.settle()
    assert s3.gets(key) == 0
    assert indexed(node.root) == {}


# --- the helper the agent's view path should use (pure) -------------------------------------


@pytest.mark.parametrize(
    ("rel", "problem"),
    [
        ("../../etc/x", "'..' path component"),
        ("a/..", "'..' path component"),
        ("/etc/x", "starts with '/'"),
        ("a//b", "an empty path component"),
        ("./a", "'.' path component"),
        ("a/", "an empty path component"),
        ("a\x1bb", "control character '\\x1b'"),
        ("a\nb", "control character '\\n'"),
        ("a\x00b", "control character '\\x00'"),
        ("a\x85b", "control character '\\x85'"),
    ],
)
def test_key_dest_refuses_what_would_escape_or_fold(rel: str, problem: str) -> None:
    with pytest.raises(CacheError, match=re.escape(problem)) as info:
        key_dest(PurePosixPath("data"), rel, "p/" + rel)
    assert repr("p/" + rel) in str(info.value)
    assert not CONTROL.search(str(info.value))


def test_key_dest_accepts_ordinary_keys() -> None:
    dest = PurePosixPath("data")
    assert key_dest(dest, "a/b c/ü.txt", "p/a/b c/ü.txt") == PurePosixPath("data/a/b c/ü.txt")
    assert key_dest(dest, "..a/b..", "p/..a/b..") == PurePosixPath("data/..a/b..")
    assert key_dest(dest, "", "p") == dest


async def test_store_messages_escape_control_characters(node: Node, s3: HostileS3) -> None:
    assert node.agent is not None
    store = node.agent.stores.s3(B)
    with pytest.raises(StoreError) as info:
        await store.head("p/\x1b[2J\nfake: line")
    check_message(info.value, re.escape(r"head s3://b/p/\x1b[2J\x0afake: line: no such object"))


async def test_a_warmup_stage_fills_the_cache_and_builds_no_view(s3: HostileS3, node: Node) -> None:
    put_good(s3)
    result = await node.stage(job="warm-1")
    assert result["view"] == "" and result["items"][0]["files_done"] == len(GOOD)
    assert not (node.root / "jobs" / "warm-1").exists()
    assert sorted(key for key, _, _ in indexed(node.root).values()) == sorted(GOOD)
    assert check_clean(node, s3) == {}  # verified objects, and no view anywhere

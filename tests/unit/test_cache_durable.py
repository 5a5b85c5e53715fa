"""Large objects readable once verified, durable in the background, and what a crash leaves.

The node cache on a real temp directory. A crash before the flush is played by closing the
cache and putting the row back as the crash would have left it (unsynced, under this or
another boot id), then opening the cache again as the next agent does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcstage.agent import calls
from hpcstage.agent.context import DEFAULT_TRANSFER, NodeContext
from hpcstage.cache import NodeCache, PendingObject, durable
from hpcstage.cache.commit import GROUP_COMMIT_MAX
from hpcstage.cache.layout import INDEX
from hpcstage.core.identity import ObjectRef
from hpcstage.protocol.messages import AgentCacheSettings, AgentStoreSettings, HelloRequest

BOOT = "boot-a"
OTHER_BOOT = "boot-b"
LARGE = os.urandom(GROUP_COMMIT_MAX + 4096)


def make_ref(key: str, data: bytes) -> ObjectRef:
    etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return ObjectRef("https://s3.example", "bucket", key, etag, len(data))


class Source:
    """A fetch that writes ``data`` and counts its calls; ``digest`` False: returns "" as the
    S3 download of a big object does (checked against the store's CRC, not hashed)."""

    def __init__(self, data: bytes, digest: bool = True) -> None:
        self.data, self.digest, self.calls = data, digest, 0

    async def __call__(self, pending: PendingObject) -> str:
        self.calls += 1
        view = memoryview(self.data)
        while view:
            view = view[os.write(pending.fd, view) :]
        return hashlib.sha256(self.data).hexdigest() if self.digest else ""


def unsynced(root: Path, ref: ObjectRef) -> str | None:
    """The row's ``unsynced`` column read straight from index.db (None: no row)."""
    db = sqlite3.connect(root / INDEX)
    try:
        found = db.execute(
            "SELECT unsynced FROM objects WHERE cache_id = ?", (ref.cache_id,)
        ).fetchone()
    finally:
        db.close()
    return None if found is None else str(found[0])


def set_unsynced(root: Path, ref: ObjectRef, boot: str) -> None:
    """Put the row back as a crash before its flush leaves it (the cache is closed)."""
    db = sqlite3.connect(root / INDEX)
    try:
        db.execute("UPDATE objects SET unsynced = ? WHERE cache_id = ?", (boot, ref.cache_id))
        db.commit()
    finally:
        db.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def flush_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hold the background flush until the event is set (then it flushes for real)."""
    gate = threading.Event()
    real = durable.fdatasync_path

    def gated(path: Path) -> None:
        gate.wait(10)
        real(path)

    monkeypatch.setattr("hpcstage.cache.durable.fdatasync_path", gated)
    yield gate
    gate.set()


def staged(root: Path, ref: ObjectRef, source: Source, *, boot: str = BOOT) -> Path:
    """Open the cache as an agent does (reconcile first), ensure ``ref``, close."""
    with NodeCache(root, boot=boot) as cache:
        cache.reconcile()
        return asyncio.run(cache.ensure(ref, source))


def test_a_large_object_is_readable_and_linkable_before_its_flush(
    root: Path, flush_gate: threading.Event
) -> None:
    ref, source = make_ref("big", LARGE), Source(LARGE)
    with NodeCache(root, boot=BOOT) as cache:
        path = asyncio.run(cache.ensure(ref, source))
        assert cache.lookup(ref) == path
        linked = cache.link("1", "data/big", path)
        assert linked.read_bytes() == LARGE
        assert unsynced(root, ref) == BOOT  # readable, and not yet durable
        assert not cache.wait_durable(timeout=0.05)  # the flush is held
        flush_gate.set()
        assert cache.wait_durable(timeout=10)
        assert unsynced(root, ref) == ""


def test_durable_before_read_flushes_before_the_row_is_written(root: Path) -> None:
    ref = make_ref("big", LARGE)
    with NodeCache(root, boot=BOOT, durable_before_read=True) as cache:
        asyncio.run(cache.ensure(ref, Source(LARGE)))
        assert unsynced(root, ref) == ""  # no background flush to wait for


def test_small_objects_are_durable_when_indexed(root: Path) -> None:
    data = b"small"
    ref = make_ref("small", data)
    with NodeCache(root, boot=BOOT) as cache:
        asyncio.run(cache.ensure(ref, Source(data)))
        assert unsynced(root, ref) == ""


def test_closing_the_cache_flushes_what_is_waiting(root: Path) -> None:
    ref = make_ref("big", LARGE)
    staged(root, ref, Source(LARGE))
    assert unsynced(root, ref) == ""


def test_after_a_reboot_corrupt_unflushed_bytes_are_refused_and_fetched_again(
    root: Path,
) -> None:
    ref, source = make_ref("big", LARGE), Source(LARGE)
    path = staged(root, ref, source)
    set_unsynced(root, ref, BOOT)
    # What a power loss can leave at the right size: blocks never written (zeros).
    path.chmod(0o644)
    with open(path, "r+b") as file:
        file.write(bytes(4096))
    with NodeCache(root, boot=OTHER_BOOT) as cache:
        report = cache.reconcile()
        assert (report.unsynced_dropped, report.unsynced_verified) == (1, 0)
        assert cache.lookup(ref) is None
        again = asyncio.run(cache.ensure(ref, source))
        assert source.calls == 2
        assert again.read_bytes() == LARGE


def test_after_a_reboot_intact_unflushed_bytes_are_verified_and_kept(root: Path) -> None:
    ref, source = make_ref("big", LARGE), Source(LARGE)
    staged(root, ref, source)
    set_unsynced(root, ref, BOOT)
    with NodeCache(root, boot=OTHER_BOOT) as cache:
        assert cache.reconcile().unsynced_verified == 1
        assert unsynced(root, ref) == ""
        assert asyncio.run(cache.ensure(ref, source)).read_bytes() == LARGE
        assert source.calls == 1


def test_after_a_reboot_unflushed_bytes_without_a_sha256_are_discarded(root: Path) -> None:
    ref, source = make_ref("big", LARGE), Source(LARGE, digest=False)
    path = staged(root, ref, source)
    set_unsynced(root, ref, BOOT)
    with NodeCache(root, boot=OTHER_BOOT) as cache:
        assert cache.reconcile().unsynced_dropped == 1
        assert not path.exists()  # nothing on record could check it: it goes
        assert asyncio.run(cache.ensure(ref, source)).read_bytes() == LARGE
        assert source.calls == 2


def test_a_truncated_unflushed_object_is_refused(root: Path) -> None:
    ref, source = make_ref("big", LARGE), Source(LARGE)
    path = staged(root, ref, source)
    set_unsynced(root, ref, BOOT)
    path.chmod(0o644)
    os.truncate(path, 4096)
    with NodeCache(root, boot=OTHER_BOOT) as cache:
        cache.reconcile()
        assert cache.lookup(ref) is None
        asyncio.run(cache.ensure(ref, source))
        assert source.calls == 2


def test_when_only_the_agent_died_unflushed_objects_are_flushed_and_kept(root: Path) -> None:
    ref, source = make_ref("big", LARGE), Source(LARGE, digest=False)
    staged(root, ref, source)
    set_unsynced(root, ref, BOOT)
    with NodeCache(root, boot=BOOT) as cache:
        report = cache.reconcile()
        assert (report.unsynced_flushed, report.unsynced_dropped) == (1, 0)
        assert unsynced(root, ref) == ""
        asyncio.run(cache.ensure(ref, source))
        assert source.calls == 1


def test_an_object_whose_flush_fails_is_dropped(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("hpcstage.cache.durable.fdatasync_path", failing)
    ref, source = make_ref("big", LARGE), Source(LARGE)
    with NodeCache(root, boot=BOOT) as cache:
        path = asyncio.run(cache.ensure(ref, source))
        assert cache.wait_durable(timeout=10)
        assert cache.lookup(ref) is None
        assert not path.exists()


def test_an_index_of_schema_1_opens_and_its_rows_are_durable(root: Path) -> None:
    root.mkdir()
    db = sqlite3.connect(root / INDEX)
    db.execute(
        "CREATE TABLE objects (cache_id TEXT PRIMARY KEY, store TEXT NOT NULL,"
        " bucket TEXT NOT NULL, key TEXT NOT NULL, etag TEXT NOT NULL, size INTEGER NOT NULL,"
        " sha256 TEXT NOT NULL, created REAL NOT NULL, last_access REAL NOT NULL)"
    )
    ref = make_ref("old", b"old bytes")
    digest = hashlib.sha256(b"old bytes").hexdigest()
    db.execute(
        "INSERT INTO objects VALUES (?, ?, ?, ?, ?, ?, ?, 1.0, 1.0)",
        (ref.cache_id, ref.store, ref.bucket, ref.key, ref.etag, ref.size, digest),
    )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    with NodeCache(root, boot=BOOT) as cache:
        final = cache.objects / ref.cache_id[:2] / ref.cache_id
        final.parent.mkdir()
        final.write_bytes(b"old bytes")
        assert cache.reconcile().objects == 1
        assert cache.lookup(ref) == final
    assert unsynced(root, ref) == ""
    db = sqlite3.connect(root / INDEX)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


@pytest.mark.parametrize("durable", [False, True])
def test_hello_applies_the_sites_durability_setting(root: Path, durable: bool) -> None:
    store = AgentStoreSettings("http://127.0.0.1:9", "us-east-1", "path", True, "", 8, 1, 1, None)
    request = HelloRequest(store, DEFAULT_TRANSFER, AgentCacheSettings(durable), None)
    with NodeCache(root, boot=BOOT) as cache:
        ctx = NodeContext(node="n1", cache=cache)
        asyncio.run(calls.hello(ctx, request))
        assert cache.durable_before_read is durable
        # O_DIRECT only where the job waits for the disk anyway.
        assert ctx.stores.transfer == dataclasses.replace(DEFAULT_TRANSFER, direct_writes=durable)

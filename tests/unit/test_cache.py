"""The node cache on a real temp directory: crash safety, singleflight, views, leases, eviction."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from hpcstage.cache import (
    Entry,
    NodeCache,
    PendingObject,
    choose_evictions,
    key_dest,
)
from hpcstage.cache.layout import lock_cache
from hpcstage.cache.node import ReadSmall
from hpcstage.cache.views import hardlinks_protected, remove_tree
from hpcstage.core.identity import ObjectRef
from hpcstage.errors import CacheError


class Clock:
    """A settable clock, so LRU and TTL tests do not depend on wall time."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(tmp_path: Path, clock: Clock) -> Iterator[NodeCache]:
    with NodeCache(tmp_path / "cache", clock=clock) as node_cache:
        yield node_cache


def etag(data: bytes) -> str:
    """A single-part S3 ETag: the MD5 of the bytes (an identity, not a security check)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def make_ref(key: str, data: bytes) -> ObjectRef:
    return ObjectRef("https://s3.example", "bucket", key, etag(data), len(data))


def write(pending: PendingObject, data: bytes) -> str:
    """Write ``data`` to the pending object as a fetch would; return its sha256."""
    view = memoryview(data)
    while view:
        view = view[os.write(pending.fd, view) :]
    return hashlib.sha256(data).hexdigest()


def store(cache: NodeCache, key: str, data: bytes) -> tuple[ObjectRef, Path]:
    ref = make_ref(key, data)
    pending = cache.begin(ref)
    return ref, cache.commit(pending, write(pending, data))


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir())


# -- objects -------------------------------------------------------------------------------


def test_commit_then_lookup_roundtrip(cache: NodeCache) -> None:
    ref, path = store(cache, "data/a.bin", b"hello world")
    assert path.read_bytes() == b"hello world"
    assert path.name == ref.cache_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert cache.lookup(ref) == path
    assert files_under(cache.objects) == [f"{ref.cache_id[:2]}/{ref.cache_id}"]


@pytest.mark.parametrize("size", [100, 10 << 20], ids=["group-commit", "own-commit"])
def test_an_object_s_file_and_its_views_carry_the_store_s_last_modified(
    cache: NodeCache, size: int
) -> None:
    data = os.urandom(size)
    when = 1_600_000_000_123_000_000  # 2020-09-13, to the millisecond a listing gives
    ref = dataclasses.replace(make_ref("dated", data), last_modified_ns=when)

    async def fetch(pending: PendingObject) -> str:
        return write(pending, data)

    async def read() -> tuple[bytes, str]:
        return data, hashlib.sha256(data).hexdigest()

    async def main() -> Path:
        # What the agent does: small objects from memory, others through a pending file.
        return await (cache.ensure_small(ref, read) if size < 1 << 20 else cache.ensure(ref, fetch))

    path = asyncio.run(main())
    assert path.stat().st_mtime_ns == when
    view = cache.link("7", PurePosixPath("in/dated"), path)
    assert view.stat().st_mtime_ns == when  # one inode: every view shows the object's time
    undated = make_ref("undated", b"x")
    pending = cache.begin(undated)
    assert cache.commit(pending, write(pending, b"x")).stat().st_mtime_ns != 0


def test_lookup_of_unknown_object_is_none(cache: NodeCache) -> None:
    assert cache.lookup(make_ref("nope", b"x")) is None


def test_lookup_forgets_an_object_deleted_behind_its_back(cache: NodeCache) -> None:
    ref, path = store(cache, "a", b"abc")
    path.unlink()
    assert cache.lookup(ref) is None
    assert cache.usage().objects == 0


def test_lookup_touches_last_access(cache: NodeCache, clock: Clock) -> None:
    old, _ = store(cache, "old", b"1")
    clock.now += 10
    store(cache, "new", b"2")
    clock.now += 10
    cache.lookup(old)  # now the most recently used: LRU must take "new" first
    assert cache.evict(max_bytes=2, high=0.9, low=0.5, ttl=3600) == [make_ref("new", b"2").cache_id]


def test_zero_byte_objects_over_the_object_mark_are_evicted_and_their_files_go(
    cache: NodeCache, clock: Clock
) -> None:
    refs = []
    for i in range(20):  # each a file, hence an inode, though no byte mark ever sees them
        clock.now += 1
        refs.append(store(cache, f"empty/{i:02d}", b"")[0])
    assert cache.evict(max_bytes=10**9, high=0.9, low=0.5, ttl=3600) == []  # bytes only
    evicted = cache.evict(max_bytes=10**9, high=0.9, low=0.5, ttl=3600, max_objects=10)
    assert evicted == [ref.cache_id for ref in refs[:15]]  # oldest first, down to 5
    assert cache.usage().objects == 5
    assert len(files_under(cache.objects)) == 5


def test_commit_with_wrong_size_is_rejected_and_aborted(cache: NodeCache) -> None:
    ref = make_ref("short", b"12345")
    pending = cache.begin(ref)
    digest = write(pending, b"123")
    with pytest.raises(CacheError, match="3 bytes, expected 5"):
        cache.commit(pending, digest)
    assert files_under(cache.objects) == []
    assert cache.lookup(ref) is None


def test_commit_with_malformed_checksum_is_rejected(cache: NodeCache) -> None:
    ref = make_ref("k", b"abc")
    pending = cache.begin(ref)
    write(pending, b"abc")
    with pytest.raises(CacheError, match="sha256"):
        cache.commit(pending, "not-hex")
    assert files_under(cache.objects) == []


def test_abort_removes_the_temp_file(cache: NodeCache) -> None:
    pending = cache.begin(make_ref("k", b"abc"))
    write(pending, b"ab")
    assert pending.path.exists()
    cache.abort(pending)
    cache.abort(pending)  # idempotent
    assert files_under(cache.objects) == []


def test_temp_file_is_private_and_named_from_the_cache_id(cache: NodeCache) -> None:
    ref = make_ref("../../etc/passwd", b"abc")
    pending = cache.begin(ref)
    assert pending.path.parent == cache.objects / ref.cache_id[:2]
    assert pending.path.name.startswith(f"{ref.cache_id}.tmp-")
    assert stat.S_IMODE(pending.path.stat().st_mode) == 0o600
    cache.abort(pending)


def test_index_survives_reopen(tmp_path: Path, clock: Clock) -> None:
    with NodeCache(tmp_path / "c", clock=clock) as cache:
        ref, path = store(cache, "k", b"persist me")
    with NodeCache(tmp_path / "c", clock=clock) as reopened:
        assert reopened.reconcile().objects == 1
        assert reopened.lookup(ref) == path
        assert reopened.usage().bytes == len(b"persist me")


# -- crash safety --------------------------------------------------------------------------


def test_crash_mid_download_leaves_no_temp_and_no_row(tmp_path: Path) -> None:
    root = tmp_path / "c"
    crashed = NodeCache(root)
    ref = make_ref("big", b"0123456789")
    pending = crashed.begin(ref)
    write(pending, b"01234")
    # The process dies: its fds close, nothing is committed or aborted.
    os.close(pending.fd)
    crashed.close()
    assert len(files_under(root / "objects")) == 1

    with NodeCache(root) as cache:
        report = cache.reconcile()
        assert (report.temps_removed, report.rows_dropped, report.orphans_removed) == (1, 0, 0)
        assert files_under(cache.objects) == []
        assert cache.lookup(ref) is None
        assert cache.usage().objects == 0


def test_reconcile_deletes_a_renamed_but_unindexed_object(cache: NodeCache) -> None:
    # A crash between the rename and the index insert leaves a complete but unverifiable file.
    ref = make_ref("k", b"abc")
    pending = cache.begin(ref)
    write(pending, b"abc")
    pending.close()
    pending.final.parent.mkdir(exist_ok=True)
    os.rename(pending.path, pending.final)
    stray = cache.objects / "zz-not-an-object"
    stray.write_bytes(b"?")
    report = cache.reconcile()
    assert report.orphans_removed == 2
    assert files_under(cache.objects) == []


def test_reconcile_drops_rows_of_missing_or_resized_files(cache: NodeCache) -> None:
    kept_ref, _ = store(cache, "kept", b"keep")
    gone_ref, gone = store(cache, "gone", b"gone")
    bad_ref, bad = store(cache, "bad", b"bad!")
    gone.unlink()
    bad.chmod(0o644)
    bad.write_bytes(b"truncated!")
    report = cache.reconcile()
    assert (report.rows_dropped, report.orphans_removed, report.objects) == (2, 1, 1)
    assert report.bytes == 4
    assert cache.lookup(kept_ref) is not None
    assert cache.lookup(gone_ref) is None
    assert cache.lookup(bad_ref) is None
    assert not bad.exists()


# -- singleflight --------------------------------------------------------------------------


def test_concurrent_ensure_fetches_once(cache: NodeCache) -> None:
    data = b"shared dataset"
    ref = make_ref("shared", data)
    calls = 0

    async def fetch(pending: PendingObject) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)  # long enough for the second caller to arrive
        return write(pending, data)

    async def main() -> list[Path]:
        return list(await asyncio.gather(cache.ensure(ref, fetch), cache.ensure(ref, fetch)))

    first, second = asyncio.run(main())
    assert first == second == cache.lookup(ref)
    assert calls == 1
    assert (cache.stats.fetched_objects, cache.stats.fetched_bytes) == (1, len(data))
    assert cache.stats.joined == 1
    assert asyncio.run(cache.ensure(ref, fetch)) == first  # present: no second fetch
    assert calls == 1


def test_fetch_failure_reaches_every_waiter_and_leaves_nothing(cache: NodeCache) -> None:
    ref = make_ref("flaky", b"0123456789")
    calls = 0

    async def failing(pending: PendingObject) -> str:
        nonlocal calls
        calls += 1
        write(pending, b"01234")
        await asyncio.sleep(0.05)
        raise ConnectionResetError("store went away")

    async def main() -> list[BaseException | Path]:
        waiters = [cache.ensure(ref, failing), cache.ensure(ref, failing)]
        return list(await asyncio.gather(*waiters, return_exceptions=True))

    results = asyncio.run(main())
    assert calls == 1
    assert all(isinstance(r, ConnectionResetError) for r in results)
    assert files_under(cache.objects) == []
    assert cache.lookup(ref) is None
    assert cache.stats.failed_fetches == 1

    async def good(pending: PendingObject) -> str:
        return write(pending, b"0123456789")

    assert asyncio.run(cache.ensure(ref, good)).read_bytes() == b"0123456789"


def test_cancelled_waiter_does_not_cancel_the_shared_fetch(cache: NodeCache) -> None:
    ref = make_ref("k", b"data")

    async def fetch(pending: PendingObject) -> str:
        await asyncio.sleep(0.05)
        return write(pending, b"data")

    async def main() -> Path:
        impatient = asyncio.create_task(cache.ensure(ref, fetch))
        patient = asyncio.create_task(cache.ensure(ref, fetch))
        await asyncio.sleep(0.01)
        impatient.cancel()
        return await patient

    assert asyncio.run(main()).read_bytes() == b"data"


def test_fetch_of_wrong_size_fails_every_waiter(cache: NodeCache) -> None:
    ref = make_ref("k", b"data")

    async def short(pending: PendingObject) -> str:
        await asyncio.sleep(0.01)
        return write(pending, b"da")

    async def main() -> list[BaseException | Path]:
        return list(
            await asyncio.gather(
                cache.ensure(ref, short), cache.ensure(ref, short), return_exceptions=True
            )
        )

    assert all(isinstance(r, CacheError) for r in asyncio.run(main()))
    assert files_under(cache.objects) == []


# -- views and leases ----------------------------------------------------------------------


def test_link_builds_the_view_from_hardlinks(cache: NodeCache) -> None:
    _, obj = store(cache, "in.dat", b"input")
    linked = cache.link("42", PurePosixPath("inputs/day1/in.dat"), obj)
    assert linked == cache.view_dir("42") / "inputs" / "day1" / "in.dat"
    assert linked.stat().st_ino == obj.stat().st_ino
    assert obj.stat().st_nlink == 2
    assert linked.read_bytes() == b"input"
    assert stat.S_IMODE((cache.view_dir("42") / "inputs").stat().st_mode) == 0o1755
    assert cache.views() == ["42"]
    assert cache.usage().leased_objects == 1


def test_link_replaces_an_existing_file_atomically(cache: NodeCache) -> None:
    _, old = store(cache, "v1", b"one")
    _, new = store(cache, "v2", b"two")
    cache.link("7", "x", old)
    cache.link("7", "x", new)
    cache.link("7", "x", new)  # same inode again: no temp link may be left behind
    assert (cache.view_dir("7") / "x").read_bytes() == b"two"
    assert (old.stat().st_nlink, new.stat().st_nlink) == (1, 2)
    assert os.listdir(cache.view_dir("7")) == ["x"]


@pytest.mark.parametrize("dest", ["../x", "/abs", "a/../../x", ".", ""])
def test_link_refuses_destinations_outside_the_view(cache: NodeCache, dest: str) -> None:
    _, obj = store(cache, "k", b"abc")
    with pytest.raises(CacheError, match="refusing"):
        cache.link("1", dest, obj)
    assert obj.stat().st_nlink == 1


def test_link_refuses_a_symlinked_parent_planted_by_the_job(
    cache: NodeCache, tmp_path: Path
) -> None:
    _, obj = store(cache, "k", b"abc")
    outside = tmp_path / "outside"
    outside.mkdir()
    (cache.view_dir("9") / "data").symlink_to(outside)
    with pytest.raises(CacheError, match="cannot link"):
        cache.link("9", "data/file", obj)
    with pytest.raises(CacheError, match="cannot link"):
        cache.link("9", "data/deeper/file", obj)
    assert list(outside.iterdir()) == []
    assert obj.stat().st_nlink == 1


def test_link_refuses_paths_that_are_not_cache_objects(cache: NodeCache, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s")
    with pytest.raises(CacheError, match="cache id"):
        cache.link("1", "s", secret)
    fake = tmp_path / ("a" * 64)
    fake.write_bytes(b"f")
    with pytest.raises(CacheError, match="not an object"):
        cache.link("1", "f", fake)


def test_link_of_an_evicted_object_fails_cleanly(cache: NodeCache) -> None:
    _, obj = store(cache, "k", b"abc")
    cache.evict(max_bytes=0, high=0.9, low=0.5, ttl=3600)
    with pytest.raises(CacheError, match="cannot link"):
        cache.link("1", "k", obj)


@pytest.mark.parametrize(
    "name", ["a" * 256, "é" * 128, "日" * 86, "a" * 200 + "😀" * 14], ids=lambda n: n[:3]
)
def test_a_key_with_a_name_over_255_bytes_is_refused_before_any_fetch(
    cache: NodeCache, name: str
) -> None:
    # Found by tests/unit/test_fuzz_keys.py. S3 allows it (keys are up to 1024 bytes);
    # no Linux filesystem does (NAME_MAX). It was refused only by link(2), after the fetch,
    # in a message naming the path, not the key.
    key = f"p/sub/{name}/x"
    with pytest.raises(CacheError, match=r"over 255 bytes") as info:
        key_dest(PurePosixPath("data"), key.removeprefix("p/"), key)
    assert repr(key)[:40] in str(info.value) and len(str(info.value)) < 400
    # 255 bytes is fine, and links.
    fits = name.encode()[:255].decode(errors="ignore")
    path = key_dest(PurePosixPath("data"), f"sub/{fits}", f"p/sub/{fits}")
    _, obj = store(cache, "k", b"abc")
    assert cache.link("1", path, obj).read_bytes() == b"abc"


@pytest.mark.parametrize("job_id", ["..", ".", "a/b", "", ".hidden", "x" * 65])
def test_unsafe_job_ids_are_refused(cache: NodeCache, job_id: str) -> None:
    with pytest.raises(CacheError, match="job id"):
        cache.view_dir(job_id)


def test_release_removes_the_view_and_ends_the_lease(cache: NodeCache, tmp_path: Path) -> None:
    ref, obj = store(cache, "k", b"abc")
    cache.link("5_1", "in/k", obj)
    view = cache.view_dir("5_1")
    # What a job leaves behind: its own files, and a symlink pointing somewhere precious.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_bytes(b"mine")
    (view / "out").mkdir()
    (view / "out" / "result").write_bytes(b"r")
    (view / "escape").symlink_to(precious)
    (view / "in" / "escape-file").symlink_to(precious / "keep")

    cache.release("5_1")
    assert not view.exists()
    assert cache.views() == []
    assert (precious / "keep").read_bytes() == b"mine"
    assert cache.lookup(ref) == obj
    assert obj.stat().st_nlink == 1
    cache.release("5_1")  # already gone: nothing to do


def _undeletable(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """Make ``name`` undeletable, as a job's ``chmod 500`` directory is to the service account
    (root, running these tests, ignores modes); returns the names tried, in order."""
    real_unlink = os.unlink
    tried: list[str] = []

    def unlink(path: str, *, dir_fd: int | None = None) -> None:
        tried.append(path)
        if path == name:
            raise PermissionError(1, "Operation not permitted", path)
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    return tried


def test_release_ends_the_view_even_when_the_job_left_something_undeletable(
    cache: NodeCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, obj = store(cache, "k", b"abc")
    cache.link("3", "in/k", obj)
    (cache.view_dir("3") / "stuck").write_bytes(b"x")
    tried = _undeletable(monkeypatch, "stuck")
    cache.release("3")  # no exception: the daemon would otherwise retry it every tick
    assert cache.views() == []
    assert obj.stat().st_nlink == 1  # the lease ended
    (left,) = cache.leftovers()
    assert left.startswith("3.")
    assert (cache.root / "released" / left / "stuck").read_bytes() == b"x"
    # Tried once at release, once more when an agent opens the cache, never in a loop.
    assert tried.count("stuck") == 1
    cache.reconcile()
    assert tried.count("stuck") == 2
    monkeypatch.undo()
    assert cache.reconcile().leftovers == 0
    assert cache.leftovers() == []
    # The job id is free again at once (a later job with a reused id gets an empty view).
    cache.link("3", "k", obj)
    assert os.listdir(cache.view_dir("3")) == ["k"]


def test_view_directories_are_sticky(cache: NodeCache) -> None:
    # The job can write into its view, but it cannot move or delete the hardlinks (owned by
    # the service account) out of the directories the agent made, e.g. into a directory of
    # its own that it then makes undeletable: that would pin the objects forever.
    _, obj = store(cache, "k", b"abc")
    cache.link("4", "in/deeper/k", obj)
    view = cache.view_dir("4")
    for path in (view, view / "in", view / "in" / "deeper"):
        assert stat.S_IMODE(path.stat().st_mode) & stat.S_ISVTX, path


def test_link_refuses_a_directory_the_job_made(cache: NodeCache) -> None:
    # Hardlinks go only into directories of the service account (sticky, see above): in one
    # of the job's own, the job could move them anywhere.
    _, obj = store(cache, "k", b"abc")
    theirs = cache.view_dir("6") / "mine"
    theirs.mkdir()
    os.chown(theirs, 4242, 4242)
    with pytest.raises(CacheError, match="not made by hpcstage"):
        cache.link("6", "mine/k", obj)
    with pytest.raises(CacheError, match="not made by hpcstage"):
        cache.link("6", "mine/deeper/k", obj)
    assert obj.stat().st_nlink == 1
    assert list(theirs.iterdir()) == []


def test_usage_counts_leased_objects(cache: NodeCache) -> None:
    _, a = store(cache, "a", b"aaaa")
    store(cache, "b", b"bb")
    cache.link("1", "a", a)
    cache.link("2", "a", a)
    usage = cache.usage()
    assert (usage.bytes, usage.objects, usage.leased_bytes, usage.leased_objects) == (6, 2, 4, 1)


# -- eviction ------------------------------------------------------------------------------


def test_evict_end_to_end(cache: NodeCache, clock: Clock) -> None:
    refs: dict[str, tuple[ObjectRef, Path]] = {}
    for name in ("oldest", "leased", "middle", "newest"):
        refs[name] = store(cache, name, name.encode().ljust(10, b"."))
        clock.now += 60
    cache.link("1", "leased", refs["leased"][1])

    # 40 bytes in a 40-byte cache: above 0.9, evict LRU down to 0.5 (20 bytes), leased stays.
    evicted = cache.evict(max_bytes=40, high=0.9, low=0.5, ttl=86400)
    assert evicted == [refs["oldest"][0].cache_id, refs["middle"][0].cache_id]
    assert cache.reconcile().rows_dropped == 0  # rows went with their files
    for name in ("oldest", "middle"):
        assert not refs[name][1].exists()
        assert cache.lookup(refs[name][0]) is None
    assert cache.lookup(refs["leased"][0]) is not None
    assert cache.lookup(refs["newest"][0]) is not None
    assert cache.usage().bytes == 20


def test_evict_by_ttl_keeps_leased_and_fresh(cache: NodeCache, clock: Clock) -> None:
    stale, _ = store(cache, "stale", b"s")
    _, pinned = store(cache, "pinned", b"p")
    cache.link("1", "p", pinned)
    clock.now += 7200
    fresh, _ = store(cache, "fresh", b"f")
    assert cache.evict(max_bytes=10**9, high=0.9, low=0.5, ttl=3600) == [stale.cache_id]
    assert cache.lookup(fresh) is not None
    assert pinned.exists()


def test_evict_does_nothing_below_high(cache: NodeCache) -> None:
    store(cache, "a", b"abc")
    assert cache.evict(max_bytes=100, high=0.9, low=0.5, ttl=3600) == []
    assert cache.usage().objects == 1


# -- big caches: paged walks --------------------------------------------------------------


@pytest.fixture
def tiny_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Index walks two rows per page, so a handful of objects spans several pages."""
    monkeypatch.setattr("hpcstage.cache.index.PAGE", 2)


@pytest.mark.usefixtures("tiny_pages")
def test_paged_eviction_matches_the_pure_policy(cache: NodeCache, clock: Clock) -> None:
    refs = []
    for n in range(7):
        refs.append(store(cache, f"k{n}", bytes([n]) * 10))
        clock.now += 30
    cache.link("1", "k2", refs[2][1])  # leased: skipped, never evicted
    clock.now += 100
    entries = [
        Entry(ref.cache_id, 10, 1_000_000.0 + 30 * n, n == 2) for n, (ref, _) in enumerate(refs)
    ]
    expected = choose_evictions(entries, 70, 0.9, 0.45, 10**6, clock.now)
    assert len(expected) == 4  # 70 bytes in a 70-byte cache: down to 31.5 bytes, k2 stays
    assert cache.evict(max_bytes=70, high=0.9, low=0.45, ttl=10**6) == expected
    left = [n for n, (ref, _) in enumerate(refs) if cache.lookup(ref) is not None]
    assert left == [2, 5, 6]
    usage = cache.usage()
    assert (usage.objects, usage.bytes, usage.leased_objects) == (3, 30, 1)


@pytest.mark.usefixtures("tiny_pages")
def test_paged_ttl_eviction_reaches_every_page(cache: NodeCache, clock: Clock) -> None:
    old = [store(cache, f"old{n}", b"o")[0] for n in range(5)]
    clock.now += 7200
    fresh = store(cache, "fresh", b"f")[0]
    evicted = cache.evict(max_bytes=10**9, high=0.9, low=0.5, ttl=3600)
    assert sorted(evicted) == sorted(ref.cache_id for ref in old)
    assert cache.lookup(fresh) is not None


def test_eviction_with_nothing_to_do_does_not_walk_the_index(
    cache: NodeCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    store(cache, "a", b"abc")

    def walk(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the index was walked")

    monkeypatch.setattr(cache._index, "lru", walk)
    assert cache.evict(max_bytes=100, high=0.9, low=0.5, ttl=3600) == []


def test_reconcile_clears_directories_no_cache_id_maps_to(cache: NodeCache) -> None:
    ref, _ = store(cache, "kept", b"keep")
    foreign = cache.objects / "zz"
    foreign.mkdir()
    (foreign / ("a" * 64)).write_bytes(b"?")
    report = cache.reconcile()
    assert (report.orphans_removed, report.objects, report.rows_dropped) == (1, 1, 0)
    assert cache.lookup(ref) is not None
    assert list(foreign.iterdir()) == []


# -- group commit of small objects ----------------------------------------------------------


def started(cache: NodeCache, key: str, data: bytes) -> tuple[PendingObject, str]:
    pending = cache.begin(make_ref(key, data))
    return pending, write(pending, data)


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync-each"])
def test_commit_group_commits_all_with_one_index_transaction(
    cache: NodeCache, monkeypatch: pytest.MonkeyPatch, syncfs: bool
) -> None:
    if not syncfs:
        monkeypatch.setattr("hpcstage.cache.commit._SYNCFS", None)
    transactions: list[int] = []
    put_many = cache._index.put_many
    monkeypatch.setattr(
        cache._index, "put_many", lambda rows: (transactions.append(len(rows)), put_many(rows))
    )
    items = [started(cache, f"k{n}", f"body {n}".encode()) for n in range(20)]
    results = cache.commit_group(items)
    assert transactions == [20]
    for n, result in enumerate(results):
        assert isinstance(result, Path)
        assert result.read_bytes() == f"body {n}".encode()
        assert stat.S_IMODE(result.stat().st_mode) == 0o444
        assert cache.lookup(make_ref(f"k{n}", f"body {n}".encode())) == result
    assert not [p for p in files_under(cache.objects) if ".tmp-" in p]


def test_commit_group_fails_only_the_bad_item(cache: NodeCache) -> None:
    good = started(cache, "good", b"fine")
    bad_pending, _ = started(cache, "bad", b"five!")
    os.ftruncate(bad_pending.fd, 2)  # a short download
    results = cache.commit_group([good, (bad_pending, hashlib.sha256(b"fi").hexdigest())])
    assert isinstance(results[0], Path)
    assert isinstance(results[1], CacheError) and "2 bytes, expected 5" in str(results[1])
    assert cache.lookup(make_ref("bad", b"five!")) is None
    assert cache.usage().objects == 1


def test_commit_group_leaves_no_unindexed_file_when_the_index_fails(
    cache: NodeCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_rows: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(cache._index, "put_many", broken)
    results = cache.commit_group([started(cache, f"k{n}", b"x") for n in range(3)])
    assert all(isinstance(r, CacheError) and "disk I/O error" in str(r) for r in results)
    assert files_under(cache.objects) == []


def test_many_small_ensures_share_group_commits(cache: NodeCache) -> None:
    datas = {f"k{n}": os.urandom(100 + n) for n in range(300)}

    async def fetch_all() -> list[Path]:
        async def fetch_one(key: str) -> Path:
            async def fetch(pending: PendingObject) -> str:
                await asyncio.sleep(0)
                return write(pending, datas[key])

            return await cache.ensure(make_ref(key, datas[key]), fetch)

        return list(await asyncio.gather(*(fetch_one(k) for k in datas)))

    paths = asyncio.run(fetch_all())
    assert [p.read_bytes() for p in paths] == list(datas.values())
    assert cache.stats.fetched_objects == 300
    assert cache.usage().objects == 300
    assert cache.reconcile().objects == 300  # nothing unindexed, nothing dropped


def test_link_async_batches_links_and_reports_each_failure(cache: NodeCache) -> None:
    objs = [store(cache, f"k{n}", f"{n}".encode())[1] for n in range(50)]

    async def link_all() -> list[Path | BaseException]:
        calls = [cache.link_async("7", f"in/{n}", obj) for n, obj in enumerate(objs)]
        calls.append(cache.link_async("7", "../escape", objs[0]))
        return list(await asyncio.gather(*calls, return_exceptions=True))

    results = asyncio.run(link_all())
    assert [r.read_bytes() for r in results[:50] if isinstance(r, Path)] == [
        f"{n}".encode() for n in range(50)
    ]
    assert isinstance(results[50], CacheError)
    assert cache.usage().leased_objects == 50


def test_a_view_removed_behind_the_caches_back_is_made_again(cache: NodeCache) -> None:
    _, obj = store(cache, "k", b"abc")
    cache.link("9", "a", obj)
    cache.release("9")
    assert cache.link("9", "b", obj).read_bytes() == b"abc"
    remove_tree(cache.jobs / "9")  # not through release(): the cache still thinks it exists
    with pytest.raises(CacheError):
        cache.link("9", "c", obj)
    assert cache.link("9", "c", obj).read_bytes() == b"abc"  # checked and made again


# -- small objects straight from memory -----------------------------------------------------


def reader(data: bytes) -> ReadSmall:
    async def read() -> tuple[bytes, str]:
        await asyncio.sleep(0)
        return data, hashlib.sha256(data).hexdigest()

    return read


def test_ensure_small_writes_the_final_object_directly(cache: NodeCache) -> None:
    ref = make_ref("small", b"tiny bytes")
    path = asyncio.run(cache.ensure_small(ref, reader(b"tiny bytes")))
    assert path.read_bytes() == b"tiny bytes"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert cache.lookup(ref) == path
    assert files_under(cache.objects) == [f"{ref.cache_id[:2]}/{ref.cache_id}"]
    assert asyncio.run(cache.ensure_small(ref, reader(b"never read"))) == path  # a hit


def test_ensure_small_replaces_an_unindexed_leftover(cache: NodeCache) -> None:
    ref = make_ref("k", b"the real bytes")
    leftover = cache.objects / ref.cache_id[:2] / ref.cache_id
    leftover.parent.mkdir()
    leftover.write_bytes(b"partial")  # a crash before the group's rows were written
    path = asyncio.run(cache.ensure_small(ref, reader(b"the real bytes")))
    assert path.read_bytes() == b"the real bytes"


def test_ensure_small_refuses_a_wrong_length_and_leaves_nothing(cache: NodeCache) -> None:
    ref = make_ref("k", b"five!")
    with pytest.raises(CacheError, match="3 bytes, expected 5"):
        asyncio.run(cache.ensure_small(ref, reader(b"abc")))
    assert files_under(cache.objects) == []
    assert cache.lookup(ref) is None


def test_ensure_small_read_failure_writes_nothing(cache: NodeCache) -> None:
    async def broken() -> tuple[bytes, str]:
        raise OSError("store went away")

    with pytest.raises(OSError, match="went away"):
        asyncio.run(cache.ensure_small(make_ref("k", b"x"), broken))
    assert files_under(cache.objects) == []
    assert cache.stats.failed_fetches == 1


def test_commit_group_takes_downloads_and_memory_objects_together(cache: NodeCache) -> None:
    from hpcstage.cache.commit import SmallObject

    downloaded = started(cache, "file", b"from a download")
    in_memory = SmallObject(
        make_ref("mem", b"from memory"), b"from memory", hashlib.sha256(b"from memory").hexdigest()
    )
    results = cache.commit_group([downloaded, in_memory])
    assert [r.read_bytes() for r in results if isinstance(r, Path)] == [
        b"from a download",
        b"from memory",
    ]
    assert cache.usage().objects == 2


# -- one agent per cache ----------------------------------------------------------------------


def test_a_second_agent_waits_for_the_cache_lock_then_gets_it(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    first = lock_cache(root, timeout=1)
    holder = rf"another agent \(pid {os.getpid()}\) still holds .*agent\.lock"
    with pytest.raises(CacheError, match=holder):
        lock_cache(root, timeout=0.3, poll=0.05)
    os.close(first)  # the first agent exits: its lock goes with it
    second = lock_cache(root, timeout=1)
    assert stat.S_IMODE((root / "agent.lock").stat().st_mode) == 0o600
    os.close(second)


@pytest.mark.parametrize("parallel", [1, 2])
def test_batcher_takes_items_submitted_right_after_its_runners_finished(parallel: int) -> None:
    # A runner that had just found nothing left must not keep a later item waiting forever
    # (this hung a warmup in the benchmark: the runner count was only lowered in a done
    # callback, which runs after the next submit).
    from concurrent.futures import ThreadPoolExecutor

    from hpcstage.cache.batch import Batcher

    def double(items: list[int]) -> list[int | BaseException]:
        return [2 * n for n in items]

    async def one_after_another() -> list[int]:
        with ThreadPoolExecutor(2) as pool:
            batcher: Batcher[int, int] = Batcher(double, pool, parallel)
            got = []
            for n in range(50):
                got.append(await batcher.submit(n))  # awaited directly: the tightest timing
            got += await asyncio.gather(*map(batcher.submit, range(5)))
            return got

    async def bounded() -> list[int]:
        return await asyncio.wait_for(one_after_another(), 10)

    assert asyncio.run(bounded()) == [2 * n for n in range(50)] + [0, 2, 4, 6, 8]


# -- index file modes ----------------------------------------------------------------------


def _index_modes(root: Path) -> dict[str, int]:
    return {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in root.iterdir()
        if p.name.startswith("index.db")
    }


def test_the_index_and_its_wal_and_shm_files_are_private(tmp_path: Path) -> None:
    # The keys of every user's staged objects are in the WAL before a checkpoint: with the
    # usual umask SQLite used to create -wal and -shm 0644 (a local user could read them).
    old = os.umask(0o022)
    try:
        with NodeCache(tmp_path / "cache") as cache:
            store(cache, "users/alice/secret-plan.dat", b"x")
            modes = _index_modes(cache.root)
            assert set(modes) == {"index.db", "index.db-wal", "index.db-shm"}
            assert modes == dict.fromkeys(modes, 0o600)
            assert b"secret-plan" in (cache.root / "index.db-wal").read_bytes()
    finally:
        os.umask(old)


def test_opening_the_cache_makes_an_old_install_s_index_files_private(tmp_path: Path) -> None:
    # An agent of an older hpcstage that was killed leaves -wal and -shm 0644 behind.
    with NodeCache(tmp_path / "cache") as cache:
        store(cache, "k", b"x")
    for name in ("index.db", "index.db-wal", "index.db-shm"):
        path = tmp_path / "cache" / name
        path.touch()
        path.chmod(0o644)
    with NodeCache(tmp_path / "cache") as cache:
        modes = _index_modes(cache.root)
        assert modes == dict.fromkeys(modes, 0o600)
        assert set(modes) >= {"index.db", "index.db-wal", "index.db-shm"}


@pytest.mark.parametrize(("text", "protected"), [("1\n", True), ("0\n", False), (None, True)])
def test_hardlinks_protected_reads_the_kernel_setting(
    tmp_path: Path, text: str | None, protected: bool
) -> None:
    setting = tmp_path / "protected_hardlinks"
    if text is not None:
        setting.write_text(text)
    assert hardlinks_protected(setting) is protected


# -- evicting one source (hpcstage cache evict SRC) ------------------------------------------


@pytest.mark.usefixtures("tiny_pages")
def test_evicting_a_prefix_takes_every_version_under_it_but_what_a_job_links(
    cache: NodeCache,
) -> None:
    old = store(cache, "set/a", b"old version")[0]
    new = store(cache, "set/a", b"new version!")[0]  # the same key, changed: another object
    others = [store(cache, f"set/b{n}", bytes([n]) * 10) for n in range(4)]
    linked = others[1]
    cache.link("7", "b1", linked[1])
    outside = [store(cache, "settings", b"not under set/")[0], store(cache, "seta", b"x")[0]]

    done = cache.evict_source("https://s3.example", "bucket", "set/", exact=False)

    assert (done.in_use, done.in_use_bytes) == (1, 10)  # the job's file stays, counted
    assert (done.evicted, done.evicted_bytes) == (5, 11 + 12 + 30)
    assert cache.lookup(linked[0]) is not None and linked[1].exists()
    assert [cache.lookup(r) for r in (old, new, others[0][0], others[3][0])] == [None] * 4
    assert all(cache.lookup(r) is not None for r in outside)
    assert cache.reconcile().rows_dropped == 0  # rows went with their files


def test_evicting_one_object_leaves_the_keys_it_prefixes(cache: NodeCache) -> None:
    exact = store(cache, "data/x", b"x")[0]
    longer = store(cache, "data/x.idx", b"i")[0]
    other_bucket = ObjectRef("https://s3.example", "other", "data/x", etag(b"x"), 1)
    done = cache.evict_source("https://s3.example", "bucket", "data/x", exact=True)
    assert (done.evicted, done.in_use) == (1, 0)
    assert cache.lookup(exact) is None and cache.lookup(longer) is not None
    assert other_bucket.cache_id != exact.cache_id


def test_evicting_a_source_forgets_an_object_whose_file_vanished(cache: NodeCache) -> None:
    ref, path = store(cache, "p/gone", b"bytes")
    path.unlink()
    assert cache.evict_source("https://s3.example", "bucket", "p/", exact=False).evicted == 0
    assert cache.held([ref.cache_id]) == set()

"""Materialising a packed dataset's selection on a node (agent/packed.py, cache/trees.py), on
real temp directories and a dataset written to a filesystem store: exact files, modes and
bytes; attach in O(1); a corrupt span fetched again or refused; eviction, release and reconcile
counting trees, not files."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from hpcstage.agent import packed
from hpcstage.agent.context import NodeContext
from hpcstage.agent.jobdir import JobDir, Owners
from hpcstage.agent.stagein import Counters
from hpcstage.cache import NodeCache
from hpcstage.cache.index import Index, TreeRow
from hpcstage.cache.trees import DIR_MODE, FILE_MODE, tree_id
from hpcstage.core.directives import SourceKind
from hpcstage.core.identity import ObjectRef
from hpcstage.core.packed import DatasetRef, Span, segment_name
from hpcstage.core.stageout import Output, Skipped
from hpcstage.errors import HpcstageError, PackError, QuotaError
from hpcstage.packed.dataset import PackedDataset
from hpcstage.packed.manifest import Member
from hpcstage.packed.segments import SegmentWriter
from hpcstage.packed.writer import VersionWriter
from hpcstage.protocol.messages import SourceSpec, StageItem
from hpcstage.store.fs import FsStore

MTIME = 1_600_000_000 * 10**9
ROW_GROUP = 4096  # rows per manifest row group: a few per dataset in these tests


def _files(n: int, size: int = 64, dirs: int = 3) -> dict[str, bytes]:
    return {f"set{i % dirs}/sub{i % 2}/{i:06d}.dat": os.urandom(size) for i in range(n)}


def _write_dataset(tmp: Path, files: dict[str, bytes], per_segment: int = 1000) -> FsStore:
    """Version 1 of ``ROOT/lib.hpack/`` on a filesystem store, ``per_segment`` files a segment."""
    store = FsStore(tmp / "store")
    (tmp / "store").mkdir()
    (tmp / "work").mkdir()
    prefix = f"{tmp}/store/lib.hpack/"

    async def write() -> None:
        writer = VersionWriter(store, prefix, 1, tmp / "work", row_group=ROW_GROUP)
        members: list[Member] = []
        names = sorted(files)
        for seq, start in enumerate(range(0, len(names), per_segment)):
            seg = SegmentWriter(tmp / "work" / f"s{seq}", segment_name(1, 0, seq))
            for path in names[start : start + per_segment]:
                members.append(seg.add(path, files[path], 0o640, MTIME))
            await writer.upload_segment(seg.finish())
        await writer.commit([members])

    asyncio.run(write())
    return store


def _item(store: FsStore, subtree: str = "", **limits: int | None) -> StageItem:
    key = f"{store.root}/lib.hpack@1/{subtree}"
    return StageItem(
        request_id=1,
        source=SourceSpec(SourceKind.S3_PACKED, "b", key, "", [], [], ""),
        dest="data",
        max_bytes=limits.get("max_bytes"),
        quota_reason="the account's quota",
        max_objects=limits.get("max_objects"),
        objects_reason="the site's limit",
    )


@dataclass
class Corrupting:
    """A filesystem store whose first ``bad`` ranged reads come back with a byte flipped (a
    store or network that garbles a response)."""

    inner: FsStore
    bad: int = 0
    always: str = ""  # a segment whose every read is garbled
    reads: int = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def read_range(self, ref: ObjectRef, start: int, length: int) -> bytes:
        data = await self.inner.read_range(ref, start, length)
        if "/segments/" in ref.key:
            self.reads += 1
            if self.bad > 0 or (self.always and ref.key.endswith(self.always)):
                self.bad -= 1
                return bytes([data[0] ^ 0xFF]) + data[1:]
        return data


def _build(
    ctx: NodeContext, store: object, item: StageItem, counters: Counters | None = None
) -> tuple[TreeRow, Counters]:
    ref = DatasetRef.parse(item.source.key)
    dataset = PackedDataset(store, ref.prefix)  # type: ignore[arg-type]
    counters = counters or Counters()

    async def run() -> TreeRow:
        info = await dataset.record(ref.version)
        tid = tree_id(dataset.url(), info.version, ref.subtree)
        build = packed._Build(ctx, dataset, info, ref, tid, counters, packed.Counts(item))
        return await build.run()

    return asyncio.run(run()), counters


@pytest.fixture
def tmp_path(tmp_path: Path) -> Iterator[Path]:
    """On tmpfs where there is one: a busy disk makes creating 20,000 files take seconds."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="hpcstage-test-"))
    yield path
    for top, dirs, _ in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(top, name), 0o700)
    shutil.rmtree(path)


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[NodeContext]:
    cache = NodeCache(tmp_path / "cache")
    yield NodeContext("n1", cache)
    cache.close()


def test_plan_reads_shares_gets_within_the_gap_and_bounds_their_size() -> None:
    def m(offset: int, size: int) -> Member:
        return Member(f"f{offset}", size, 0o644, 0, "s", offset, 0)

    plan = packed.plan_reads([m(1536, 100), m(512, 100), m(10_000, 50)], gap=2000, limit=4096)
    assert [(s, [x.offset for x in part]) for s, part in plan] == [
        (Span(512, 1636), [512, 1536]),
        (Span(10_000, 10_050), [10_000]),
    ]
    # The limit splits a run of close members; a member larger than it gets a GET of its own.
    plan = packed.plan_reads([m(0, 3000), m(3072, 3000), m(6144, 9000)], gap=2000, limit=4096)
    assert [s for s, _ in plan] == [Span(0, 3000), Span(3072, 6072), Span(6144, 15144)]


def test_a_subtree_is_materialised_exactly(tmp_path: Path, ctx: NodeContext) -> None:
    files = _files(3000, dirs=3)
    files["set1/empty"] = b""
    store = _write_dataset(tmp_path, files, per_segment=700)
    row, counters = _build(ctx, store, _item(store, "set1/"))
    want = {p[len("set1/") :]: d for p, d in files.items() if p.startswith("set1/")}
    root = ctx.cache.trees.root(row.tree_id)
    got = {}
    for top, _dirs, names in os.walk(root):
        assert stat.S_IMODE(os.stat(top).st_mode) == DIR_MODE
        for name in names:
            path = Path(top, name)
            st = path.stat()
            assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (FILE_MODE, MTIME)
            got[str(path.relative_to(root))] = path.read_bytes()
    assert got == want  # paths below the subtree, as the job sees them under DEST
    assert (row.files, row.bytes, row.dirs) == (len(want), sum(map(len, want.values())), 2)
    # set1/ is the middle third of the path-sorted files: two of the five segments, one GET
    # each (its members are contiguous in them).
    assert (counters.files_done, counters.fetched) == (len(want), 2)
    assert stat.S_IMODE(ctx.cache.trees.path(row.tree_id).stat().st_mode) == 0o700
    assert not [n for n in os.listdir(ctx.cache.trees.dir) if ".tmp-" in n]


def test_attach_is_one_symlink_and_one_lease_whatever_the_size(
    tmp_path: Path, ctx: NodeContext
) -> None:
    store = _write_dataset(tmp_path, _files(20_000, size=4096, dirs=4), per_segment=5000)
    started = time.perf_counter()
    row, _ = _build(ctx, store, _item(store))
    print(f"materialised 20,000 x 4 KiB in {time.perf_counter() - started:.2f} s")
    sample = ctx.cache.trees.root(row.tree_id) / "set0/sub0/000000.dat"
    assert len(list(ctx.cache.trees.root(row.tree_id).glob("*/*/*"))) == 20_000
    before = sample.stat()
    started = time.perf_counter()
    for job in ("j1", "j2", "j3"):
        link = ctx.cache.trees.attach(
            row.tree_id, ctx.cache.view_dir(job), PurePosixPath("in/data"), job, "someone"
        )
    took = time.perf_counter() - started
    assert took < 0.2, took  # no per-file work: three attaches of 20,000 files
    assert os.path.islink(link) and (link / "set0/sub0/000000.dat").read_bytes()
    assert sample.stat().st_ctime_ns == before.st_ctime_ns  # no file touched
    assert ctx.cache.trees.leased() == {row.tree_id}
    assert ctx.cache.trees.release("j1") == []  # "someone" still has j2 and j3
    ctx.cache.release("j2")
    ctx.cache.trees.release("j2")
    revoked = ctx.cache.trees.release("j3")
    assert [(r.path, r.user) for r in revoked] == [(ctx.cache.trees.path(row.tree_id), "someone")]
    assert ctx.cache.trees.leased() == set()


def test_a_corrupt_span_is_fetched_again_once(tmp_path: Path, ctx: NodeContext) -> None:
    store = _write_dataset(tmp_path, _files(200), per_segment=100)
    flaky = Corrupting(store, bad=1)
    row, counters = _build(ctx, flaky, _item(store))
    assert row.files == 200
    assert counters.fetched == flaky.reads == 3  # two segments, one of them twice


def test_a_corrupt_segment_is_refused_naming_it(tmp_path: Path, ctx: NodeContext) -> None:
    store = _write_dataset(tmp_path, _files(200), per_segment=100)
    bad = segment_name(1, 0, 1)
    with pytest.raises(PackError, match=rf"corrupt segment {bad} of .*lib\.hpack/ in the store"):
        _build(ctx, Corrupting(store, always=bad), _item(store))
    assert os.listdir(ctx.cache.trees.dir) == []  # the temp tree went
    assert ctx.cache.trees.rows() == []


def test_the_budget_counts_the_selected_files(tmp_path: Path, ctx: NodeContext) -> None:
    store = _write_dataset(tmp_path, _files(300), per_segment=100)
    with pytest.raises(QuotaError, match="over quota"):
        _build(ctx, store, _item(store, max_bytes=64 * 299))
    with pytest.raises(HpcstageError, match="more than 99 objects"):
        _build(ctx, store, _item(store, "set0/", max_objects=99))
    row, _ = _build(ctx, store, _item(store, "set0/", max_objects=100))
    assert row.files == 100


def test_eviction_counts_trees_bytes_and_inodes_and_spares_leased_ones(
    tmp_path: Path, ctx: NodeContext
) -> None:
    store = _write_dataset(tmp_path, _files(300), per_segment=100)
    rows = [_build(ctx, store, _item(store, f"set{i}/"))[0] for i in range(3)]
    usage = ctx.cache.usage()
    assert (usage.trees, usage.tree_bytes) == (3, 300 * 64)
    assert usage.tree_inodes == sum(r.files + r.dirs + 2 for r in rows)
    ctx.cache.trees.attach(rows[0].tree_id, ctx.cache.view_dir("j"), PurePosixPath("d"), "j", "")
    # Inodes over the mark: every unleased tree goes, the leased one stays.
    evicted = ctx.cache.evict(10**12, 0.5, 0.1, 10**9, max_objects=200)
    assert sorted(evicted) == sorted(f"tree:{r.tree_id}" for r in rows[1:])
    assert [r.tree_id for r in ctx.cache.trees.rows()] == [rows[0].tree_id]
    assert not ctx.cache.trees.path(rows[1].tree_id).exists()


def test_reconcile_drops_temp_trees_and_unsynced_trees_of_another_boot(
    tmp_path: Path, ctx: NodeContext
) -> None:
    store = _write_dataset(tmp_path, _files(300), per_segment=100)
    kept, _ = _build(ctx, store, _item(store, "set0/"))
    lost, _ = _build(ctx, store, _item(store, "set1/"))
    half = ctx.cache.trees.begin("0" * 32)  # an agent killed mid-build, in another boot
    (half.temp / "journal").write_text("another boot\n")
    half.close()
    index = ctx.cache._index
    index.put_tree(TreeRow(**{**lost.__dict__, "durable": 0, "boot_id": "another boot"}))
    report = ctx.cache.reconcile()
    assert report.trees_removed == 2
    assert [r.tree_id for r in ctx.cache.trees.rows()] == [kept.tree_id]
    assert sorted(os.listdir(ctx.cache.trees.dir)) == [kept.tree_id]


def test_an_index_of_schema_1_opens_and_gains_the_tree_tables(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "index.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE objects (cache_id TEXT PRIMARY KEY, store TEXT, bucket TEXT,"
        " key TEXT, etag TEXT, size INTEGER, sha256 TEXT, created REAL,"
        " last_access REAL)"
    )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    index = Index(path)
    try:
        assert index.trees() == []
    finally:
        index.close()


def test_stage_out_skips_an_attached_tree_instead_of_failing(
    tmp_path: Path, ctx: NodeContext
) -> None:
    store = _write_dataset(tmp_path, _files(30), per_segment=10)
    row, _ = _build(ctx, store, _item(store))
    view = ctx.cache.view_dir("j")
    ctx.cache.trees.attach(row.tree_id, view, PurePosixPath("in/data"), "j", "")
    (view / "result.txt").write_text("out")
    me = os.geteuid()
    with JobDir(view, Owners(me, me)) as jobdir:
        everything = list(jobdir.walk(PurePosixPath("."), "p/"))
        named = list(jobdir.walk(PurePosixPath("in/data"), "p/"))
    assert [e for e in everything if isinstance(e, Output)] == [
        Output("result.txt", "p/result.txt", 3)
    ]
    skipped = [e for e in everything if not isinstance(e, Output)]
    assert [type(e) for e in skipped] == [Skipped] and skipped[0].rel == "in/data"
    assert [type(e) for e in named] == [Skipped]


def test_packed_sources_are_pinned_once_and_never_copied_from_peers() -> None:
    from hpcstage.staging.peer import copyable
    from hpcstage.staging.pin import needs_pin

    assert needs_pin("s3://bkt/lib/x.hpack/set1/")
    assert not needs_pin("s3://bkt/lib/x.hpack@3/set1/")
    assert not needs_pin("s3://bkt/lib/plain/") and not needs_pin("")
    assert not copyable(SourceSpec.of("s3://bkt/lib/x.hpack@3/"))
    assert copyable(SourceSpec.of("s3://bkt/lib/plain/"))


def test_a_tree_of_many_directories_holds_few_fds(tmp_path: Path, ctx: NodeContext) -> None:
    import resource

    files = {f"d{i:04d}/e/f.dat": os.urandom(16) for i in range(1500)}  # 3,000 directories
    store = _write_dataset(tmp_path, files, per_segment=500)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        row, _ = _build(ctx, store, _item(store))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (row.files, row.dirs) == (1500, 3000)
    root = ctx.cache.trees.root(row.tree_id)
    assert stat.S_IMODE((root / "d0007/e").stat().st_mode) == DIR_MODE
    assert (root / "d0007/e/f.dat").read_bytes() == files["d0007/e/f.dat"]


@dataclass
class Failing:
    """A filesystem store whose ``fail_at``-th segment read fails, late (the agent dies)."""

    inner: FsStore
    fail_at: int
    reads: int = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def read_range(self, ref: ObjectRef, start: int, length: int) -> bytes:
        if "/segments/" in ref.key:
            self.reads += 1
            if self.reads == self.fail_at:
                await asyncio.sleep(0.5)  # the earlier spans are written meanwhile
                raise OSError("connection reset")
        return await self.inner.read_range(ref, start, length)


def test_a_build_cut_short_resumes_in_the_same_boot_skipping_written_spans(
    tmp_path: Path, ctx: NodeContext
) -> None:
    files = _files(600)
    store = _write_dataset(tmp_path, files, per_segment=100)  # six segments, a span each
    trees = ctx.cache.trees
    # The network fails (as the agent being killed would, the temp tree stays for the retry).
    with pytest.raises(OSError, match="connection reset"):
        _build(ctx, Failing(store, fail_at=6), _item(store))
    (temp,) = [n for n in os.listdir(trees.dir) if ".tmp-" in n]
    done = (trees.dir / temp / "journal").read_text().splitlines()[1:]
    assert len(done) == 5
    assert ctx.cache.reconcile().trees_removed == 0  # kept for the next stage to resume
    row, counters = _build(ctx, store, _item(store))
    assert counters.fetched == 1  # only the span not written before
    assert (row.files, counters.files_done) == (600, 600)
    root = trees.root(row.tree_id)
    got = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.dat")}
    assert got == files
    assert not (trees.path(row.tree_id) / "journal").exists()

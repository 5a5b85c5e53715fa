"""Staging a packed dataset on a node: materialise the selection once, attach jobs in O(1).

The version is pinned by the daemon (a request's key carries ``@N``; a warmup without one
takes the newest). The selection's tree (cache/trees.py) is built once per node: the
manifest's row groups that meet the subtree are read a row group at a time, the members are
grouped by segment and read with ranged GETs of at most ``MAX_GET`` bytes (a few at a time, so
memory stays bounded), every member's CRC-32 is checked before any of its span is written, and
a span that fails is fetched once more before the stage fails naming the segment. Jobs then
attach: an ACL entry for their user on the tree, a symlink in their view, a lease row.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hpcstage.agent.access import grant_read, revoke_read
from hpcstage.agent.context import NodeContext
from hpcstage.cache.index import TreeRow
from hpcstage.cache.trees import TreeBuild, tree_id
from hpcstage.cache.views import check_dest
from hpcstage.core import limits
from hpcstage.core.identity import ObjectRef
from hpcstage.core.packed import RANGE_GAP, DatasetRef, Span, VersionInfo
from hpcstage.core.units import format_size
from hpcstage.errors import HpcstageError, PackError, QuotaError, TransientStoreError
from hpcstage.packed.dataset import PackedDataset
from hpcstage.packed.manifest import Member
from hpcstage.protocol.messages import StageItem

MAX_GET = 8 * 2**20  # bytes per ranged GET: memory holds GETS of them at most (and a copy)
GETS = 4  # ranged GETs in flight per tree being built
# Files are written by two threads: the per-file syscalls release the GIL, more threads only
# contend for it (docs/benchmarks.md measures the materialisation).
_WRITERS = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="packed-write")


class Progress(Protocol):
    """The counters a packed stage updates (the agent's ``stagein.Counters``)."""

    files_done: int
    bytes_done: int
    files_total: int | None
    bytes_total: int | None
    fetched: int
    fetched_bytes: int


def plan_reads(
    members: Iterable[Member], gap: int = RANGE_GAP, limit: int = MAX_GET
) -> list[tuple[Span, list[Member]]]:
    """The ranged GETs that fetch ``members`` (of one segment, none empty), each with the
    members it holds: members closer than ``gap`` share a GET unless it would outgrow
    ``limit`` bytes (a member larger than ``limit`` gets a GET of its own)."""
    out: list[tuple[Span, list[Member]]] = []
    part: list[Member] = []
    start = end = 0
    for m in sorted(members, key=lambda m: m.offset):
        stop = m.offset + m.size
        if part and m.offset - end <= gap and max(end, stop) - start <= limit:
            part.append(m)
            end = max(end, stop)
            continue
        if part:
            out.append((Span(start, end), part))
        part, start, end = [m], m.offset, stop
    if part:
        out.append((Span(start, end), part))
    return out


def by_segment(members: list[Member]) -> dict[str, list[Member]]:
    """``members`` grouped by segment, in order of first appearance."""
    out: dict[str, list[Member]] = {}
    for m in members:
        out.setdefault(m.segment, []).append(m)
    return out


def write_span(
    build: TreeBuild, span: Span, data: bytes, members: list[Member], strip: int, batch: str = ""
) -> str:
    """Verify every member's CRC-32 in ``data`` (the bytes of ``span``), then write them all,
    each at its path less the first ``strip`` characters (the subtree), and journal ``batch``
    as done (when given); "" when done, else the path of the first member that failed
    (nothing written then)."""
    view = memoryview(data)
    if len(view) != span.size:
        return members[0].path
    for m in members:
        at = m.offset - span.start
        if zlib.crc32(view[at : at + m.size]) != m.crc32:
            return m.path
    with build.writer() as writer:
        for m in members:
            at = m.offset - span.start
            writer.write(m.path[strip:], view[at : at + m.size], m.mtime_ns)
    build.count(len(members), sum(m.size for m in members))
    if batch:
        build.finished(batch)
    return ""


@dataclass
class Counts:
    """Files and bytes selected so far, checked against the input's budget as they grow."""

    item: StageItem
    files: int = 0
    bytes: int = 0

    def add(self, files: int, size: int) -> None:
        self.files, self.bytes = self.files + files, self.bytes + size
        if self.item.max_bytes is not None and self.bytes > self.item.max_bytes:
            raise QuotaError(
                f"over quota: this input needs more than {format_size(self.item.max_bytes)}"
                f" and {self.item.quota_reason}"
            )
        if self.item.max_objects is not None and self.files > self.item.max_objects:
            raise limits.too_many_objects(self.item.max_objects, self.item.objects_reason)


@dataclass
class _Build:
    """One tree being built: its dataset, version, destination and running GETs."""

    ctx: NodeContext
    dataset: PackedDataset
    info: VersionInfo
    ref: DatasetRef
    tid: str
    counters: Progress
    counts: Counts
    segments: dict[str, ObjectRef] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Spans being written by the writer threads: a cancelled task does not stop its thread,
    # so a failed build waits for these before it removes (or keeps) the temp tree.
    writes: set[asyncio.Future[str]] = field(default_factory=set)
    build: TreeBuild = field(init=False)

    async def run(self) -> TreeRow:
        """Build the tree in a temp directory, then commit it; syncfs in the background."""
        trees = self.ctx.cache.trees
        self.build = await asyncio.to_thread(trees.begin, self.tid)
        try:
            await self._fill()
            row = await asyncio.to_thread(
                trees.commit,
                self.tid,
                self.build,
                self.dataset.url(),
                self.info.version,
                self.ref.subtree,
            )
        except BaseException as exc:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await asyncio.gather(*self.writes, return_exceptions=True)
            if _resumable(exc):  # the retry resumes it (its journal says what is written)
                self.build.close()
            else:
                await asyncio.to_thread(trees.abort, self.build)
            raise
        # Readable now; durable once the file system is flushed, off the stage's path.
        syncing = asyncio.create_task(asyncio.to_thread(trees.sync, self.tid))
        _syncing.add(syncing)
        syncing.add_done_callback(_syncing.discard)
        return row

    async def _fill(self) -> None:
        gets = asyncio.Semaphore(GETS)
        async for batch in self.dataset.select(self.info, self.ref.subtree):
            self.counts.add(len(batch), sum(m.size for m in batch))
            for name, members in by_segment(batch).items():
                empty = [m for m in members if not m.size]
                if empty:
                    await self._write(Span(0, 0), b"", empty)
                full = [m for m in members if m.size]
                for span, part in plan_reads(full):
                    if f"{name} {span.start} {span.end}" in self.build.done:
                        self._resumed(part)  # written before the agent was killed
                        continue
                    await gets.acquire()  # memory: at most GETS spans in flight
                    self._raise_failed()
                    task = asyncio.create_task(self._span(name, span, part))
                    task.add_done_callback(lambda _t: gets.release())
                    self.tasks.append(task)
                self.tasks = [t for t in self.tasks if not t.done() or t.exception()]
        await asyncio.gather(*self.tasks)

    def _resumed(self, members: list[Member]) -> None:
        size = sum(m.size for m in members)
        self.build.count(len(members), size)
        self.counters.files_done += len(members)
        self.counters.bytes_done += size

    def _raise_failed(self) -> None:
        for task in self.tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _span(self, name: str, span: Span, members: list[Member]) -> None:
        ref = self.segments.get(name)
        if ref is None:
            ref = self.segments[name] = await self.dataset.segment_ref(self.info, name)
        for attempt in range(2):  # a span that fails its CRC is fetched once more
            data = await self.dataset.store.read_range(ref, span.start, span.size)
            self.counters.fetched += 1
            self.counters.fetched_bytes += len(data)
            bad = await self._write(span, data, members, f"{name} {span.start} {span.end}")
            if not bad:
                return
            if attempt:
                raise PackError(
                    f"corrupt segment {name} of {self.dataset.url()} in the store: {bad!r}"
                    f" fails its CRC-32 twice (bytes {span.start}-{span.end - 1}); repack"
                    " the dataset or restore the segment"
                )

    async def _write(self, span: Span, data: bytes, members: list[Member], batch: str = "") -> str:
        loop = asyncio.get_running_loop()
        strip = len(self.ref.subtree)
        write = loop.run_in_executor(
            _WRITERS, write_span, self.build, span, data, members, strip, batch
        )
        self.writes.add(write)
        write.add_done_callback(self.writes.discard)
        bad = await asyncio.shield(write)
        if not bad:
            self.counters.files_done += len(members)
            self.counters.bytes_done += sum(m.size for m in members)
        return bad


async def stage_packed(
    ctx: NodeContext, item: StageItem, job: str | None, user: str, counters: Progress
) -> None:
    """Stage one packed input: its tree built if this node lacks it, then (with a job)
    attached at ``item.dest`` in the job's view."""
    ref = DatasetRef.parse(item.source.key)
    store = ctx.stores.s3(item.source.bucket)
    dataset = PackedDataset(store, ref.prefix)
    row = None
    if ref.version is not None:  # pinned (by the daemon): a cached tree needs no request
        tid = tree_id(dataset.url(), ref.version, ref.subtree)
        row = await asyncio.to_thread(ctx.cache.trees.lookup, tid)
    if row is None:
        info = await dataset.record(ref.version)
        tid = tree_id(dataset.url(), info.version, ref.subtree)
        row = await asyncio.to_thread(ctx.cache.trees.lookup, tid)
    if row is None:
        build = _Build(ctx, dataset, info, ref, tid, counters, Counts(item))
        row = await _singleflight(ctx, tid, build.run)
    Counts(item).add(row.files, row.bytes)  # also when another job's build was joined
    counters.files_total = counters.files_done = row.files
    counters.bytes_total = counters.bytes_done = row.bytes
    if row.files == 0:
        return  # the caller refuses an empty input
    if job is not None:
        await attach(ctx, tid, job, user, item.dest)


async def attach(ctx: NodeContext, tid: str, job: str, user: str, dest: str) -> Path:
    """Grant ``user`` the tree and link it into the job's view (O(1) in the tree's size)."""
    trees = ctx.cache.trees
    await asyncio.to_thread(grant_read, trees.path(tid), user)
    view = ctx.cache.view_dir(job)
    return await asyncio.to_thread(trees.attach, tid, view, check_dest(dest), job, user)


async def release(ctx: NodeContext, job: str) -> None:
    """End the job's leases on trees; remove ACL entries no job of their user needs now."""
    for revoke in await asyncio.to_thread(ctx.cache.trees.release, job):
        await asyncio.to_thread(revoke_read, revoke.path, revoke.user)


_building: dict[tuple[int, str], asyncio.Task[TreeRow]] = {}


async def _singleflight(
    ctx: NodeContext, tid: str, start: Callable[[], Awaitable[TreeRow]]
) -> TreeRow:
    """Jobs staging the same selection at once share one build."""
    key = (id(ctx.cache), tid)
    task = _building.get(key)
    if task is None:

        async def run() -> TreeRow:
            return await start()

        task = asyncio.create_task(run(), name=f"packed-{tid[:12]}")
        _building[key] = task

        def done(finished: asyncio.Task[TreeRow]) -> None:
            _building.pop(key, None)
            if not finished.cancelled():
                finished.exception()  # retrieved: every waiter may have given up

        task.add_done_callback(done)
    return await asyncio.shield(task)


def _resumable(exc: BaseException) -> bool:
    """True when a build that failed with ``exc`` is worth resuming (the store or the
    network failed, or the agent is stopping), False when its bytes or its budget are wrong."""
    if isinstance(exc, TransientStoreError | asyncio.CancelledError):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, HpcstageError)


_syncing: set[asyncio.Task[None]] = set()  # background syncfs calls (kept referenced)


__all__ = ["attach", "plan_reads", "release", "stage_packed"]

"""``hpcstage pack``: a directory or an S3 prefix into a new version of a packed dataset, in
three steps that each resume (docs/packed-datasets.md, "Packing").

1. **plan**: list the source once, in path order, into a Parquet listing (with ``--update``,
   merge-joined with the parent version's manifest: unchanged files keep their old segment);
   upload it and the plan under ``_pack/<v>/``. Version ``v`` is the newest + 1, or the pending
   pack's, which is resumed.
2. **slices**: the listing is cut into fixed slices (``core.packing``); each slice's files to
   pack go into segments, each uploaded and then marked done by its part manifest. Finished
   segments are skipped. A single process runs ``jobs`` slices at a time; a Slurm array runs
   them as tasks.
3. **merge**: the listing, read in order, takes each packed file's row from its segment's part
   manifest (and each kept file's from the listing); the rows go to ``VersionWriter.commit``,
   which writes the manifest and then the record. The work files are removed.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from hpcstage.core.packed import (
    DEFAULT_SEGMENT_SIZE,
    VersionInfo,
    segment_key,
    segment_name,
)
from hpcstage.core.packing import (
    DEFAULT_SLICE_FILES,
    SEGMENT_MAX_FILES,
    PackPlan,
    SegmentCutter,
    task_slices,
    unchanged,
)
from hpcstage.errors import PackError
from hpcstage.packed.dataset import PackedDataset
from hpcstage.packed.manifest import ManifestWriter, Member
from hpcstage.packed.segments import SegmentWriter
from hpcstage.packed.sources import Source
from hpcstage.packed.work import PackWork, free_version, pending_versions
from hpcstage.packed.writer import VersionWriter
from hpcstage.store.protocol import ObjectStore

_VERIFY_CHUNK = 8 * 2**20


@dataclass(frozen=True)
class PackSettings:
    """How a pack cuts and how hard it works (the cuts are fixed by the plan once made)."""

    segment_size: int = DEFAULT_SEGMENT_SIZE
    slice_files: int = DEFAULT_SLICE_FILES
    max_files: int = SEGMENT_MAX_FILES
    jobs: int = 4  # slices packed at a time by one process
    update: bool = False
    restart: bool = False  # abandon a pending pack instead of resuming it


@dataclass
class PackStats:
    """Progress, for the bar and --json (updated as segments finish)."""

    files_total: int = 0
    bytes_total: int = 0
    files: int = 0
    bytes: int = 0
    segments: int = 0  # written by this run
    segments_skipped: int = 0  # found done (a resumed pack)
    phase: str = "listing"
    listed: int = 0


@dataclass
class Packer:
    """Packs ``source`` into the dataset at ``prefix`` on ``store``."""

    store: ObjectStore
    prefix: str
    source: Source | None  # None for the merge step, which reads no source
    spool: Path
    settings: PackSettings = field(default_factory=PackSettings)
    stats: PackStats = field(default_factory=PackStats)
    on_progress: Callable[[PackStats], None] = lambda stats: None

    # -- step 1: plan ---------------------------------------------------------------------

    async def plan(self) -> tuple[PackWork, PackPlan, bool]:
        """The pack to work on: a pending one (resumed: True) or a new one, planned now."""
        dataset = PackedDataset(self.store, self.prefix)
        newest = max(await dataset.versions(), default=0)
        live = []
        for pending in await pending_versions(self.store, self.prefix):
            stale = pending <= newest or self.settings.restart
            if stale:  # committed but not cleaned up, or abandoned by --restart
                await PackWork(self.store, self.prefix, pending, self.spool).remove()
            else:
                live.append(pending)
        for pending in live:  # newest + 1, or later if a job's stage-out held that number
            work = PackWork(self.store, self.prefix, pending, self.spool)
            found = await work.plan()
            if found is not None:
                self._check_resumable(found)
                self._totals(found)
                return work, found, True
        # A new pack: not a number another writer (a job's packed stage-out) has begun.
        version = await free_version(self.store, self.prefix, newest + 1)
        work = PackWork(self.store, self.prefix, version, self.spool)
        parent = await dataset.record(newest) if newest else None
        plan = await self._list(work, parent)
        self._totals(plan)
        return work, plan, False

    def _check_resumable(self, plan: PackPlan) -> None:
        if self.source is not None and plan.source != self.source.url:
            raise PackError(
                f"{self.store.url(self.prefix)} has a pending pack of {plan.source}: run it"
                " again with that source to finish it, or pass --restart to abandon it"
            )

    def _totals(self, plan: PackPlan) -> None:
        self.stats.files_total, self.stats.bytes_total = plan.to_pack, plan.bytes_to_pack
        self.stats.phase = "packing"

    async def _list(self, work: PackWork, parent: VersionInfo | None) -> PackPlan:
        if self.source is None:
            raise PackError(f"{work.url()}: no pack in progress to continue")
        local = self.spool / f"listing-{work.version:08d}.parquet"
        writer = ManifestWriter(local)
        counts = _Counts()
        try:
            old = self._parent_rows(parent) if self.settings.update and parent else None
            async for batch in _joined(self.source.listing(), old, counts):
                writer.add_all(batch)
                self.stats.listed = counts.files
                self.on_progress(self.stats)
            writer.close()
        except BaseException:
            writer.abort()
            local.unlink(missing_ok=True)
            raise
        s = self.settings
        plan = PackPlan(
            version=work.version,
            parent=parent.version if parent else None,
            source=self.source.url,
            files=counts.files,
            to_pack=counts.to_pack,
            bytes_to_pack=counts.bytes,
            dropped=counts.dropped,
            skipped=self.source.skipped,
            slice_files=s.slice_files,
            segment_size=s.segment_size,
            max_files=s.max_files,
            created=_now(),
        )
        if plan.files == 0:
            local.unlink(missing_ok=True)
            raise PackError(f"{self.source.url}: no files to pack")
        await work.save(plan, local)
        work.local_listing = local
        return plan

    async def _parent_rows(self, parent: VersionInfo) -> AsyncIterator[list[Member]]:
        dataset = PackedDataset(self.store, self.prefix)
        async for batch in dataset.select(parent, ""):
            yield batch

    # -- step 2: slices -------------------------------------------------------------------

    async def pack_slices(self, work: PackWork, plan: PackPlan, task: int, tasks: int) -> None:
        """Pack this task's slices (all of them: task 0 of 1), ``jobs`` at a time."""
        if self.source is None:
            raise PackError("packing slices needs the source")
        writer = self._writer(work, plan, None)
        done = await work.done()
        # Segments are built ``jobs`` at a time, from one slice or several (their cuts are
        # known from the listing alone); at most ``jobs`` slices read their listing rows at
        # once, each holding one segment's rows while it waits: memory stays bounded.
        gate = asyncio.Semaphore(max(1, self.settings.jobs))
        building = asyncio.Semaphore(max(1, self.settings.jobs))
        slices = plan.slices

        async def one(slice_no: int) -> None:
            async with gate:
                job = _Slice(work, plan, writer, done, building, slice_no)
                await self._pack_slice(job, slices[slice_no])

        async with asyncio.TaskGroup() as group:
            for slice_no in task_slices(len(slices), task, tasks):
                group.create_task(one(slice_no))

    async def _pack_slice(self, job: _Slice, rows: range) -> None:
        cutter = SegmentCutter(job.plan.segment_size, job.plan.max_files)
        group: list[Member] = []
        name = ""
        async with asyncio.TaskGroup() as tasks:
            async for batch in job.work.listing_rows(rows):
                for member in (m for m in batch if not m.segment):
                    seq, started = cutter.place(member.path, member.size)
                    if started:
                        self._start(tasks, job, name, group)
                        name, group = segment_name(job.plan.version, job.slice_no, seq), []
                        if name not in job.done:
                            # Held from the segment's first row until it is uploaded: at
                            # most ``jobs`` segments' rows are in memory at once.
                            await job.building.acquire()
                    if name in job.done:
                        self._count([member], segments=0)
                    else:
                        group.append(member)
            self._start(tasks, job, name, group)

    def _start(self, tasks: asyncio.TaskGroup, job: _Slice, name: str, group: list[Member]) -> None:
        """Build and upload the segment ``name`` of ``group`` (nothing: a done one)."""
        if not name:
            return
        if name in job.done:
            self.stats.segments_skipped += 1
            return

        async def build() -> None:
            try:
                await self._segment(job, name, group)
            finally:
                job.building.release()

        tasks.create_task(build())

    async def _segment(self, job: _Slice, name: str, group: list[Member]) -> None:
        assert self.source is not None
        seg = SegmentWriter(self.spool / name, name)
        try:
            members = await self.source.add(seg, group)
            finished = seg.finish()
        except BaseException:
            seg.abort()
            raise
        group.clear()  # the listed rows: ``members`` replaces them
        try:
            info = await job.writer.upload_segment(finished)
        finally:
            finished.path.unlink(missing_ok=True)
        await job.work.put_part(info, members)
        self._count(members, segments=1)

    def _count(self, group: list[Member], segments: int) -> None:
        self.stats.segments += segments
        self.stats.files += len(group)
        self.stats.bytes += sum(m.size for m in group)
        self.on_progress(self.stats)

    # -- step 3: merge --------------------------------------------------------------------

    async def merge(self, work: PackWork, plan: PackPlan) -> VersionInfo:
        """Commit the version from the listing and the part manifests; remove the work."""
        parent = None
        if plan.parent is not None:
            parent = await PackedDataset(self.store, self.prefix).record(plan.parent)
        if await work.plan() != plan:
            raise PackError(
                f"{work.url()}: another pack of this dataset planned version {plan.version}"
                " again meanwhile; run one pack at a time (it resumes)"
            )
        writer = self._writer(work, plan, parent)
        self.stats.phase = "merging"
        self.on_progress(self.stats)
        info = await writer.commit(self._merged(work, plan, writer))
        await work.remove()
        self.stats.phase = "done"
        return info

    async def _merged(
        self, work: PackWork, plan: PackPlan, writer: VersionWriter
    ) -> AsyncIterator[list[Member]]:
        for slice_no, rows in enumerate(plan.slices):
            cutter = SegmentCutter(plan.segment_size, plan.max_files)
            part: list[Member] = []
            at = 0
            async for batch in work.listing_rows(rows):
                out: list[Member] = []
                for listed in batch:
                    if listed.segment:  # kept in the parent's segment (--update)
                        out.append(listed)
                        continue
                    seq, started = cutter.place(listed.path, listed.size)
                    if started:
                        _all_used(part, at)
                        part, at = await self._part(work, writer, plan, slice_no, seq)
                    out.append(_matching(part, at, listed))
                    at += 1
                yield out
            _all_used(part, at)

    async def _part(
        self, work: PackWork, writer: VersionWriter, plan: PackPlan, slice_no: int, seq: int
    ) -> tuple[list[Member], int]:
        info, members = await work.part(segment_name(plan.version, slice_no, seq))
        writer.known_segment(info)
        return members, 0

    def _writer(self, work: PackWork, plan: PackPlan, parent: VersionInfo | None) -> VersionWriter:
        return VersionWriter(
            self.store, self.prefix, plan.version, self.spool, parent=parent, source=plan.source
        )

    # -- all of it, in this process ---------------------------------------------------------

    async def run(self) -> tuple[VersionInfo, PackPlan]:
        """Plan (or resume), pack every slice, merge."""
        work, plan, _ = await self.plan()
        if self.settings.update and plan.parent and not plan.to_pack and not plan.dropped:
            await work.remove()  # nothing changed: no new version
            return await PackedDataset(self.store, self.prefix).record(plan.parent), plan
        await self.pack_slices(work, plan, 0, 1)
        return await self.merge(work, plan), plan

    async def verify(self, info: VersionInfo, only_new: bool = True) -> int:
        """Read back the version's segments (those this version wrote, unless ``only_new`` is
        False) and check each against its record's size and SHA-256; the bytes read."""
        total = 0
        mine = f"{info.version:08d}-"
        dataset = PackedDataset(self.store, self.prefix)
        for seg in info.segments:
            if only_new and not seg.name.startswith(mine):
                continue
            ref = await dataset.segment_ref(info, seg.name)
            sha = hashlib.sha256()
            for start in range(0, ref.size, _VERIFY_CHUNK):
                sha.update(
                    await self.store.read_range(ref, start, min(_VERIFY_CHUNK, ref.size - start))
                )
            if sha.hexdigest() != seg.sha256:
                raise PackError(
                    f"{self.store.url(self.prefix + segment_key(seg.name))}: SHA-256 mismatch"
                )
            total += ref.size
        return total


@dataclass(frozen=True)
class _Slice:
    """What packing one slice works with."""

    work: PackWork
    plan: PackPlan
    writer: VersionWriter
    done: set[str]  # segments found finished
    building: asyncio.Semaphore  # segments being built in this process
    slice_no: int


def _matching(part: list[Member], at: int, listed: Member) -> Member:
    if at >= len(part) or part[at].path != listed.path or part[at].size != listed.size:
        got = part[at].path if at < len(part) else "nothing"
        raise PackError(f"a part manifest holds {got!r} where the listing has {listed.path!r}")
    return part[at]


def _all_used(part: list[Member], at: int) -> None:
    if at != len(part):
        raise PackError(f"a part manifest holds {len(part) - at} rows the listing does not")


@dataclass
class _Counts:
    files: int = 0
    to_pack: int = 0
    bytes: int = 0
    dropped: int = 0


async def _joined(
    listing: AsyncIterator[list[Member]],
    old: AsyncIterator[list[Member]] | None,
    counts: _Counts,
) -> AsyncIterator[list[Member]]:
    """The source's listing, each file that is unchanged since the parent version (``old``,
    its manifest in path order) replaced by the parent's row: a merge-join of two sorted
    streams, holding a batch of each."""
    olds = _rows(old) if old is not None else None
    current = await anext(olds, None) if olds is not None else None
    async for batch in listing:
        out: list[Member] = []
        for new in batch:
            while olds is not None and current is not None and current.path < new.path:
                counts.dropped += 1
                current = await anext(olds, None)
            kept = current is not None and current.path == new.path
            if kept and current and unchanged(new.size, new.etag, current.size, current.etag):
                out.append(current)
            else:
                out.append(new)
                counts.to_pack += 1
                counts.bytes += new.size
            if kept and olds is not None:
                current = await anext(olds, None)
        counts.files += len(out)
        yield out
    while olds is not None and current is not None:
        counts.dropped += 1
        current = await anext(olds, None)


async def _rows(batches: AsyncIterator[list[Member]]) -> AsyncIterator[Member]:
    async for batch in batches:
        for member in batch:
            yield member


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

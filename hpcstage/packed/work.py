"""A pack in progress on the store: ``_pack/<v>/`` under the dataset holds its plan, its
listing and one part manifest per finished segment. Everything a step needs to resume, or an
array task on another node needs to start, is there; nothing is kept on the machine that
began the pack.

``plan.json`` is written once the listing is uploaded: a pending pack without one is planned
again. A part manifest is uploaded after its segment: a segment is done exactly when its part
exists, and its footer records the segment's size, SHA-256 and file count.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hpcstage.core.packed import SEGMENTS, WORK, SegmentInfo, manifest_key, version_key
from hpcstage.core.packing import (
    LISTING,
    MAX_SKIPPED_NUMBERS,
    PARTS,
    PLAN,
    PackPlan,
    part_key,
    pending_version,
    segment_of_part,
    work_prefix,
)
from hpcstage.errors import ObjectMissingError, PackError
from hpcstage.packed.dataset import range_file
from hpcstage.packed.manifest import COLUMNS, ManifestWriter, Member, RangeFile, members_of
from hpcstage.store.protocol import ObjectStore

_ROWS_AT_A_TIME = 4096
SEGMENT_META = "hpcstage.segment"  # a part manifest's footer key: the segment's record entry


@dataclass
class PackWork:
    """The work files of the pack of ``version`` of the dataset at ``prefix``."""

    store: ObjectStore
    prefix: str
    version: int
    spool: Path  # private local directory
    local_listing: Path | None = None  # the listing, when this process made it

    @property
    def base(self) -> str:
        return self.prefix + work_prefix(self.version)

    def url(self, rel: str = "") -> str:
        return self.store.url(self.base + rel)

    async def plan(self) -> PackPlan | None:
        """The plan, or None when the pack was not planned to the end."""
        try:
            ref = await self.store.head(self.base + PLAN)
        except ObjectMissingError:
            return None
        text = await self.store.read_range(ref, 0, ref.size)
        plan = PackPlan.from_json(text, self.url(PLAN))
        if plan.version != self.version:
            raise PackError(f"{self.url(PLAN)} plans version {plan.version}")
        return plan

    async def save(self, plan: PackPlan, listing: Path) -> None:
        """Upload the listing, then the plan (the mark that planning is over)."""
        await self.store.upload(listing, self.base + LISTING)
        path = self.spool / PLAN
        path.write_text(plan.to_json())
        try:
            await self.store.upload(path, self.base + PLAN)
        finally:
            path.unlink(missing_ok=True)

    async def done(self) -> set[str]:
        """The segments whose part manifest exists."""
        names: set[str] = set()
        async for obj in self.store.list(self.base + PARTS):
            name = segment_of_part(obj.key)
            if name is not None:
                names.add(name)
        return names

    async def put_part(self, info: SegmentInfo, members: list[Member]) -> None:
        """Upload the part manifest of a segment already uploaded: marks it done."""
        path = self.spool / f"part-{info.name}.parquet"
        writer = ManifestWriter(path, metadata={SEGMENT_META: json.dumps(info.to_json())})
        try:
            writer.add_all(members)
            writer.close()
            await self.store.upload(path, self.prefix + part_key(self.version, info.name))
        except BaseException:
            writer.abort()
            raise
        finally:
            path.unlink(missing_ok=True)

    async def part(self, name: str) -> tuple[SegmentInfo, list[Member]]:
        """A finished segment's record entry and rows (PackError: not finished)."""
        key = self.prefix + part_key(self.version, name)
        try:
            ref = await self.store.head(key)
        except ObjectMissingError:
            raise PackError(
                f"segment {name} of {self.store.url(self.prefix)} was never finished: run the"
                " pack again (it resumes) or look at the log of the slice task that failed"
            ) from None
        data = await self.store.read_range(ref, 0, ref.size)
        return await asyncio.to_thread(_read_part, data, self.store.url(key))

    async def listing_rows(self, rows: range) -> AsyncIterator[list[Member]]:
        """The listing's rows in ``rows``, a row group at a time (ranged reads of the row
        groups that hold them)."""
        if self.local_listing is not None:  # this process planned the pack
            source: str | RangeFile = str(self.local_listing)
        else:
            ref = await self.store.head(self.base + LISTING)
            source = range_file(self.store, ref, asyncio.get_running_loop())
        batches = await asyncio.to_thread(_row_batches, source, rows, self.url(LISTING))
        while (batch := await asyncio.to_thread(next, batches, None)) is not None:
            yield batch

    async def remove(self) -> None:
        """Delete every work file (the pack is committed, or abandoned)."""
        async for obj in self.store.list(self.base):
            await self.store.delete(obj.key)
        if self.local_listing is not None:
            self.local_listing.unlink(missing_ok=True)


def _read_part(data: bytes, where: str) -> tuple[SegmentInfo, list[Member]]:
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read()
        doc = json.loads((table.schema.metadata or {})[SEGMENT_META.encode()])
        info = SegmentInfo(
            str(doc["name"]), int(doc["size"]), str(doc["sha256"]), int(doc["files"])
        )
        if tuple(table.schema.names) != COLUMNS:
            raise ValueError(f"columns {table.schema.names}")
    except (KeyError, ValueError, TypeError, pa.ArrowException) as exc:
        raise PackError(f"{where}: not a part manifest ({exc})") from None
    return info, members_of(table)


def _row_batches(source: str | RangeFile, rows: range, where: str) -> Iterator[list[Member]]:
    try:
        parquet = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as exc:
        raise PackError(f"{where}: not a readable listing ({exc})") from None
    start = 0
    for i in range(parquet.metadata.num_row_groups):
        count = parquet.metadata.row_group(i).num_rows
        lo, hi = max(rows.start, start), min(rows.stop, start + count)
        if lo < hi:
            table = parquet.read_row_group(i).slice(lo - start, hi - lo)
            # Rows become Python objects a few thousand at a time: a row group's worth for
            # each slice being packed would be most of a pack's memory.
            for at in range(0, table.num_rows, _ROWS_AT_A_TIME):
                yield members_of(table.slice(at, _ROWS_AT_A_TIME))
        start += count
        if start >= rows.stop:
            return


async def pending_versions(store: ObjectStore, prefix: str) -> list[int]:
    """The versions with a pack in progress (work files under ``_pack/``)."""
    found: set[int] = set()
    async for obj in store.list(prefix + WORK):
        version = pending_version(obj.key[len(prefix) :])
        if version is not None:
            found.add(version)
    return sorted(found)


async def free_version(store: ObjectStore, prefix: str, version: int) -> int:
    """``version``, or the first number after it that no writer has begun to use.

    Two kinds of writer pick numbers: a pack (``hpcstage pack``, maybe the daemon's) and a
    job's packed stage-out. Neither holds a lock, so each takes only a number with no trace of
    the other: a segment or manifest (a stage-out is uploading), a version record, or a pack's
    ``plan.json`` (a pack is listing its source; its segments come later, under the same
    names as ours would). The window left is two writers starting within one listing.
    """
    for _ in range(MAX_SKIPPED_NUMBERS):
        if not await _used(store, prefix, version):
            return version
        version += 1
    raise PackError(
        f"{store.url(prefix)}: {MAX_SKIPPED_NUMBERS} version numbers from"
        f" {version - MAX_SKIPPED_NUMBERS} on hold segments but no record (writers died or"
        " are under way)"
    )


async def _used(store: ObjectStore, prefix: str, version: int) -> bool:
    async for _ in store.list(f"{prefix}{SEGMENTS}{version:08d}-"):
        return True
    plan = f"{work_prefix(version)}{PLAN}"
    for key in (manifest_key(version), version_key(version), plan):
        try:
            await store.head(prefix + key)
        except ObjectMissingError:
            continue
        return True
    return False


def private_spool(base: Path) -> Path:
    """Create ``base`` (mode 0700) if needed and return it."""
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(base, 0o700)
    return base

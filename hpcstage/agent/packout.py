"""A packed stage-out (``--stage-out=SRC:s3://B/P/NAME.hpack/:pack``): a job's outputs written
as one new version of a packed dataset, a few large PUTs instead of one per file.

The files are the ones the ordinary stage-out would upload (``JobDir.walk``: no symlink
followed, each file judged and read on its own fd), in path order; their bytes are streamed
from that fd into spool segments in a private directory of the cache, each segment uploaded
when it is full, then ``VersionWriter.commit`` writes the manifest and, last, the record.

Exactly once and never overwriting:

- The record names its writer (``VersionInfo.writer``: the job, its submit time and the
  directive). Before anything is written the newest records are read; one by this writer
  means an earlier attempt finished (the agent or the daemon died before hearing of it), and
  that version is reported.
- Every key written is new: segments are PUT with If-None-Match (a HEAD right before where the
  store ignores it) and a version number whose segments already exist (an attempt that died
  before its record, or another writer under way) is skipped. So a version number may be left
  unused, with segments no record references: they are never read, and harmless.
- Another writer that takes the version first (its segment or record is there before ours)
  makes this attempt start again at the next number, up to ``MAX_VERSION_TRIES`` times.

Verified: each segment's SHA-256 and size are in the record and its metadata; after upload
every segment is HEADed and its size checked (the PUTs carry Content-MD5), and right before
the manifest and record are written no other manifest or record of the number may exist and
every segment must still be the one uploaded (its size and SHA-256 metadata).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hpcstage.agent.jobdir import JobDir, same_file
from hpcstage.core.packed import (
    DEFAULT_SEGMENT_SIZE,
    SegmentInfo,
    VersionInfo,
    check_member_path,
    manifest_key,
    segment_key,
    segment_name,
    version_key,
)
from hpcstage.core.stageout import Output
from hpcstage.errors import (
    HpcstageError,
    ObjectChangedError,
    PackError,
    TransientStoreError,
    UnsafeFileError,
)
from hpcstage.packed.dataset import PackedDataset
from hpcstage.packed.manifest import Member
from hpcstage.packed.segments import Finished, SegmentWriter
from hpcstage.packed.work import free_version
from hpcstage.packed.writer import VersionWriter, spool_dir
from hpcstage.protocol.messages import FileOutcome
from hpcstage.store.protocol import Precondition, UploadOptions
from hpcstage.store.recycle import UploadJournal
from hpcstage.store.s3 import S3Store

MAX_VERSION_TRIES = 5  # version numbers tried when other writers keep taking them first
# A version made this long before the job ended cannot be the job's own: the search for an
# earlier attempt's version stops there (the margin covers clocks that disagree).
CLOCK_MARGIN = 3600.0

Outcome = Callable[[FileOutcome], None]


@dataclass(frozen=True)
class PackTarget:
    """Where and as whom one packed stage-out writes."""

    store: S3Store
    prefix: str  # the dataset's key prefix, ending in ".hpack/"
    writer: str  # VersionInfo.writer: who writes (job, submit time, directive)
    ended_at: float  # when the job ended
    work: Path  # a private directory for spool files (removed at the end)
    journal: UploadJournal  # multipart uploads opened, aborted by a retry if left open
    source: str = ""  # what is packed, for people reading the record
    segment_size: int = DEFAULT_SEGMENT_SIZE

    def url(self, version: int) -> str:
        """The version as a directive would pin it: ``s3://b/p/NAME.hpack@N/``."""
        return self.store.url(f"{self.prefix[:-1]}@{version}/")

    def member_key(self, version: int, path: str) -> str:
        """How a packed file is named in reports: ``p/NAME.hpack@N/PATH``."""
        return f"{self.prefix[:-1]}@{version}/{path}"


class _Taken(Exception):
    """Another writer took the version number this attempt was writing."""


async def pack_out(
    target: PackTarget, jobdir: JobDir, outputs: list[Output], outcome: Outcome
) -> VersionInfo:
    """Write ``outputs`` (in path order, as listed by ``jobdir.walk``) as a new version of the
    dataset, or find the one an earlier attempt of this writer made; report each file."""
    if not target.writer:  # it would take any record without one for its own
        raise PackError("a packed stage-out needs its writer's name (the daemon sends it)")
    dataset = PackedDataset(target.store, target.prefix)
    try:
        for _ in range(MAX_VERSION_TRIES):
            earlier = await made_by(dataset, target.writer, target.ended_at - CLOCK_MARGIN)
            if earlier is not None:
                await _report_earlier(dataset, earlier, target, outputs, outcome)
                return earlier
            versions = await dataset.versions()
            parent = await dataset.record(versions[-1]) if versions else None
            newest = versions[-1] if versions else 0
            version = await free_version(target.store, target.prefix, newest + 1)
            try:
                return await _write_version(target, jobdir, outputs, version, parent, outcome)
            except _Taken:
                continue
    finally:
        shutil.rmtree(target.work, ignore_errors=True)
    raise TransientStoreError(
        f"{dataset.url()}: other writers took {MAX_VERSION_TRIES} version numbers in a row"
        " first; the stage-out is tried again later"
    )


async def made_by(dataset: PackedDataset, writer: str, not_before: float) -> VersionInfo | None:
    """The newest version ``writer`` made, looking back to versions made at ``not_before``."""
    for version in reversed(await dataset.versions()):
        info = await dataset.record(version)
        if info.writer == writer:
            return info
        if _created(info) < not_before:
            return None
    return None


def _created(info: VersionInfo) -> float:
    try:
        when = datetime.datetime.strptime(info.created, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return 0.0  # unreadable: older than anything, so the search stops (nothing is lost)
    return when.replace(tzinfo=datetime.UTC).timestamp()


async def _report_earlier(
    dataset: PackedDataset,
    info: VersionInfo,
    target: PackTarget,
    outputs: list[Output],
    outcome: Outcome,
) -> None:
    """Each output as the earlier attempt's version holds it: present, or failed if it is
    not in it (that attempt could not read it)."""
    packed = {m.path: m.size async for batch in dataset.select(info, "") for m in batch}
    for out in outputs:
        path = out.key[len(target.prefix) :]
        if packed.get(path) == out.size:
            key = target.member_key(info.version, path)
            outcome(FileOutcome(out.rel, key, out.size, "present", "", ""))
        else:
            why = f"not in version {info.version}, written by an earlier attempt"
            outcome(FileOutcome(out.rel, "", 0, "failed", why, ""))


@dataclass
class _Segment:
    """One filled segment: the spool file and the members it holds, and what failed."""

    finished: Finished
    members: list[Member]
    failed: list[FileOutcome] = field(default_factory=list)
    next_output: int = 0


async def _write_version(
    target: PackTarget,
    jobdir: JobDir,
    outputs: list[Output],
    version: int,
    parent: VersionInfo | None,
    outcome: Outcome,
) -> VersionInfo:
    writer = VersionWriter(
        target.store,
        target.prefix,
        version,
        spool_dir(target.work),
        parent=parent,
        source=target.source,
        writer=target.writer,
    )
    members: list[Member] = []
    failed: list[FileOutcome] = []
    index, seq = 0, 0
    while index < len(outputs):
        name = segment_name(version, 0, seq)
        seg = await asyncio.to_thread(_fill, target, jobdir, outputs, index, name)
        index, failed = seg.next_output, failed + seg.failed
        try:
            if seg.members:
                writer.known_segment(await _upload(target, seg))
                members += seg.members
                seq += 1
        finally:
            seg.finished.path.unlink(missing_ok=True)
    await _still_ours(target, version, writer.new_segments.values())
    try:
        info = await writer.commit([members])
    except PackError:
        if await target.store.head_or_none(target.prefix + version_key(version)) is not None:
            raise _Taken from None
        raise
    for member, out in zip(members, _kept(outputs, failed), strict=True):
        key = target.member_key(version, member.path)
        outcome(FileOutcome(out.rel, key, member.size, "uploaded", "", ""))
    for bad in failed:
        outcome(bad)
    return info


def _kept(outputs: list[Output], failed: list[FileOutcome]) -> list[Output]:
    """The outputs that went into the version, in order (those not failed)."""
    dropped = {f.path for f in failed}
    return [out for out in outputs if out.rel not in dropped]


def _fill(
    target: PackTarget, jobdir: JobDir, outputs: list[Output], start: int, name: str
) -> _Segment:
    """Stream outputs from ``start`` on into a new segment until it is full (a thread)."""
    writer = SegmentWriter(target.work / name, name)
    members: list[Member] = []
    failed: list[FileOutcome] = []
    index = start
    try:
        while index < len(outputs) and (not members or writer.offset < target.segment_size):
            out, index = outputs[index], index + 1
            try:
                members.append(_add(writer, jobdir, out, out.key[len(target.prefix) :]))
            except (HpcstageError, OSError) as exc:
                if isinstance(exc, PackError) and "shrank" in str(exc):
                    raise  # the segment holds a cut member: this attempt is over
                failed.append(FileOutcome(out.rel, "", 0, "failed", str(exc), ""))
        finished = writer.finish()
    except BaseException:
        writer.abort()
        raise
    kept = Finished(finished.path, name, finished.size, finished.sha256, len(members))
    return _Segment(kept, members, failed, index)


def _add(writer: SegmentWriter, jobdir: JobDir, out: Output, path: str) -> Member:
    """Append one output, read from the fd it was checked on; HpcstageError if it cannot be
    (its bytes may then be in the segment, unreferenced by the manifest)."""
    check_member_path(path)
    fd, opened = jobdir.open(out.rel)
    try:
        if opened.st_size != out.size:
            raise UnsafeFileError("it changed since it was listed (written to after the job)")
        member = writer.add_fd(
            path,
            fd,
            out.size,
            stat.S_IMODE(opened.st_mode),
            opened.st_mtime_ns,
            etag=str(opened.st_mtime_ns),
        )
        if not same_file(opened, os.fstat(fd)):
            raise HpcstageError(
                "it changed while it was being staged out (written to after the job ended)"
            )
        return member
    finally:
        os.close(fd)


async def _upload(target: PackTarget, seg: _Segment) -> SegmentInfo:
    """PUT a segment as a new key (never over another) and check the size stored."""
    done = seg.finished
    key = target.prefix + segment_key(done.name)
    only_new = UploadOptions(Precondition(""), target.journal, done.sha256)
    try:
        await target.store.upload(done.path, key, options=only_new)
    except ObjectChangedError:
        raise _Taken from None
    ref = await target.store.head(key)
    if ref.size != done.size:
        raise TransientStoreError(f"{target.store.url(key)}: {ref.size} bytes, sent {done.size}")
    return SegmentInfo(done.name, done.size, done.sha256, done.files)


async def _still_ours(target: PackTarget, version: int, segments: Iterable[SegmentInfo]) -> None:
    """Right before the manifest and record: no other writer has begun either, and every
    segment is still the one this attempt uploaded (a writer that took the same number and
    PUT without a condition would show here). ``commit`` PUTs the manifest without one."""
    for key in (manifest_key(version), version_key(version)):
        if await target.store.head_or_none(target.prefix + key) is not None:
            raise _Taken
    for seg in segments:
        found = await target.store.describe(target.prefix + segment_key(seg.name))
        if found is None or found.ref.size != seg.size or found.sha256 not in ("", seg.sha256):
            raise _Taken

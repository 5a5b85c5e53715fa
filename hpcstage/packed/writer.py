"""Writing one new version of a packed dataset: segments uploaded as they are finished, then
the manifest, then the version record, last, so that a version exists only once it is whole.

``hpcstage pack`` and a packed stage-out both write through ``VersionWriter``. The record is
written only if no record of that version exists (If-None-Match where the store honours it, a
HEAD right before the PUT elsewhere): two writers racing for one version number cannot both
win, and the loser's segments, named by version, are never referenced by anyone.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hpcstage.core.packed import (
    DEFAULT_ROW_GROUP,
    SegmentInfo,
    VersionInfo,
    manifest_key,
    segment_key,
    version_key,
)
from hpcstage.errors import ObjectChangedError, ObjectMissingError, PackError
from hpcstage.packed.manifest import ManifestWriter, Member
from hpcstage.packed.segments import Finished
from hpcstage.store.protocol import ObjectStore, Precondition, UploadOptions
from hpcstage.store.s3 import S3Store

_CHUNK = 1 << 20


@dataclass
class VersionWriter:
    """Writes version ``version`` of the dataset at ``prefix`` (ending ``.hpack/``) on ``store``,
    spooling the manifest under ``work`` (a private local directory)."""

    store: ObjectStore
    prefix: str
    version: int
    work: Path
    parent: VersionInfo | None = None
    source: str = ""
    row_group: int = DEFAULT_ROW_GROUP
    new_segments: dict[str, SegmentInfo] = field(default_factory=dict)
    writer: str = ""  # recorded in the version (VersionInfo.writer)

    async def upload_segment(self, finished: Finished) -> SegmentInfo:
        """Upload a finished segment file as ``segments/<name>``; its record entry."""
        name = finished.name
        info = SegmentInfo(name, finished.size, finished.sha256, finished.files)
        await self.store.upload(finished.path, self.prefix + segment_key(name))
        self.new_segments[name] = info
        return info

    def known_segment(self, info: SegmentInfo) -> None:
        """A segment uploaded earlier (by a pack now resumed, or another slice's task)."""
        self.new_segments[info.name] = info

    async def commit(
        self, members: AsyncIterable[list[Member]] | Iterable[list[Member]]
    ) -> VersionInfo:
        """Write the manifest of ``members`` (batches, in path order) and then the record.

        Every segment a member names must be one uploaded here or one of the parent's.
        PackError when another writer made this version first.
        """
        spool = self.work / f"manifest-{self.version:08d}.parquet"
        writer = ManifestWriter(spool, self.row_group)
        used: dict[str, SegmentInfo] = {}
        files = size = 0
        try:
            async for batch in _batches(members):
                for member in batch:
                    if member.segment not in used:
                        used[member.segment] = self._segment(member.segment)
                    files, size = files + 1, size + member.size
                writer.add_all(batch)
            writer.close()
        except BaseException:
            writer.abort()
            spool.unlink(missing_ok=True)
            raise
        try:
            manifest_size, manifest_sha = _size_and_sha256(spool)
            await self.store.upload(spool, self.prefix + manifest_key(self.version))
        finally:
            spool.unlink(missing_ok=True)
        info = VersionInfo(
            version=self.version,
            created=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            files=files,
            size=size,
            manifest=manifest_key(self.version),
            manifest_size=manifest_size,
            manifest_sha256=manifest_sha,
            segments=tuple(sorted(used.values(), key=lambda s: s.name)),
            parent=self.parent.version if self.parent is not None else None,
            source=self.source,
            writer=self.writer,
        )
        await self._write_record(info)
        return info

    def _segment(self, name: str) -> SegmentInfo:
        if name in self.new_segments:
            return self.new_segments[name]
        if self.parent is not None:
            return self.parent.segment(name)
        raise PackError(f"a manifest row names segment {name!r}, which was never uploaded")

    async def _write_record(self, info: VersionInfo) -> None:
        key = self.prefix + version_key(info.version)
        record = self.work / f"version-{info.version:08d}.json"
        record.write_text(info.to_json())
        try:
            if isinstance(self.store, S3Store):
                # If-None-Match: * where the store honours it, a HEAD just before elsewhere.
                only_new = UploadOptions(only_if=Precondition(""))
                await self.store.upload(record, key, options=only_new)
            else:
                if await _exists(self.store, key):
                    raise ObjectChangedError(f"{key} exists")
                await self.store.upload(record, key)
        except ObjectChangedError:
            raise PackError(
                f"{self.store.url(key)} was written by another pack at the same time: run"
                " again to make the next version"
            ) from None
        finally:
            record.unlink(missing_ok=True)


async def _exists(store: ObjectStore, key: str) -> bool:
    try:
        await store.head(key)
    except ObjectMissingError:
        return False
    return True


async def _batches(
    members: AsyncIterable[list[Member]] | Iterable[list[Member]],
) -> AsyncIterable[list[Member]]:
    if isinstance(members, AsyncIterable):
        async for batch in members:
            yield batch
    else:
        for batch in members:
            yield batch


def _size_and_sha256(path: Path) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def spool_dir(base: Path) -> Path:
    """A private directory for a writer's spool files."""
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(base, 0o700)
    return base

"""A packed dataset on a store, for reading: its versions, a version's record, the members a
subtree selects, and a member's verified bytes.

The store is any ``ObjectStore`` (S3, or a shared filesystem). The manifest is read through a
``RangeFile`` by pyarrow in a worker thread, each ranged read running on the caller's event
loop, so a selection costs the footer plus the row groups it needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from hpcstage.core.identity import ObjectRef
from hpcstage.core.packed import (
    VERSIONS,
    DatasetRef,
    Span,
    VersionInfo,
    newest,
    segment_key,
    spans,
    version_key,
    version_of_key,
)
from hpcstage.errors import ObjectMissingError, PackError
from hpcstage.packed.manifest import ManifestReader, Member, RangeFile
from hpcstage.packed.segments import member_bytes
from hpcstage.store.protocol import ObjectStore

RECORD_MAX = 64 * 2**20  # a version record above this is refused unread


@dataclass
class PackedDataset:
    """The dataset whose key prefix (ending in ``.hpack/``) is ``prefix`` on ``store``."""

    store: ObjectStore
    prefix: str
    manifest_bytes_read: int = 0  # bytes of manifests fetched, for the benchmark's accounting

    @classmethod
    def at(cls, store: ObjectStore, ref: DatasetRef) -> PackedDataset:
        return cls(store, ref.prefix)

    def url(self, rel: str = "") -> str:
        return self.store.url(self.prefix + rel)

    async def versions(self) -> list[int]:
        """Every complete version, oldest first."""
        found = []
        async for obj in self.store.list(self.prefix + VERSIONS):
            version = version_of_key(obj.key[len(self.prefix) :])
            if version is not None:
                found.append(version)
        return sorted(found)

    async def record(self, version: int | None = None) -> VersionInfo:
        """The record of ``version`` (None: the newest); PackError when there is none."""
        if version is None:
            version = newest(await self.versions())
            if version is None:
                raise PackError(f"{self.url()} holds no packed dataset version (versions/ empty)")
        key = self.prefix + version_key(version)
        try:
            ref = await self.store.head(key)
        except ObjectMissingError:
            raise PackError(f"{self.url()} has no version {version}") from None
        if ref.size > RECORD_MAX:
            raise PackError(f"{self.store.url(key)} is {ref.size} bytes: not a version record")
        text = await self.store.read_range(ref, 0, ref.size) if ref.size else b""
        info = VersionInfo.from_json(text, self.store.url(key))
        if info.version != version:
            raise PackError(f"{self.store.url(key)} records version {info.version}")
        return info

    async def manifest_ref(self, info: VersionInfo) -> ObjectRef:
        """The manifest object of ``info``, checked to be the size the record says."""
        ref = await self.store.head(self.prefix + info.manifest)
        if ref.size != info.manifest_size:
            raise PackError(
                f"{self.url(info.manifest)} is {ref.size} bytes, its version record says"
                f" {info.manifest_size}: the dataset was changed in place"
            )
        return ref

    async def select(self, info: VersionInfo, subtree: str) -> AsyncIterator[list[Member]]:
        """The members under ``subtree`` of version ``info``, in path order, a row group at a
        time (memory holds one row group, whatever the dataset's size)."""
        ref = await self.manifest_ref(info)
        source = range_file(self.store, ref, asyncio.get_running_loop())
        reader = await asyncio.to_thread(ManifestReader, source, self.store.url(ref.key))
        batches: Iterator[list[Member]] = reader.select(subtree)
        try:
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                yield batch
        finally:
            self.manifest_bytes_read += source.fetched

    async def segment_ref(self, info: VersionInfo, name: str) -> ObjectRef:
        """The segment ``name`` as the store has it, checked against the record's size."""
        seg = info.segment(name)
        ref = await self.store.head(self.prefix + segment_key(name))
        if ref.size != seg.size:
            raise PackError(f"{self.url(segment_key(name))} is {ref.size} bytes, not {seg.size}")
        return ref

    async def read_members(self, segment: ObjectRef, members: list[Member]) -> list[bytes]:
        """The verified bytes of ``members`` (all in ``segment``), fetched by ranged GETs."""
        out: dict[str, bytes] = {}
        wanted = [(m.offset, m.size) for m in members if m.size]
        by_span: list[tuple[Span, bytes]] = []
        for span in spans(wanted):
            by_span.append((span, await self.store.read_range(segment, span.start, span.size)))
        for member in members:
            if not member.size:
                out[member.path] = b""
                continue
            span, data = next((s, d) for s, d in by_span if s.start <= member.offset < s.end)
            out[member.path] = bytes(member_bytes(span, data, member))
        return [out[m.path] for m in members]


def range_file(store: ObjectStore, ref: ObjectRef, loop: asyncio.AbstractEventLoop) -> RangeFile:
    """A RangeFile over the object ``ref`` whose ranged GETs run on ``loop``: for pyarrow,
    reading in a worker thread while the loop serves the requests."""

    def fetch(start: int, length: int) -> bytes:
        return asyncio.run_coroutine_threadsafe(store.read_range(ref, start, length), loop).result()

    return RangeFile(ref.size, fetch)

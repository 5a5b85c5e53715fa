"""What ``hpcstage pack`` packs: a directory (local or on a shared filesystem) or an S3 prefix.

A source lists its files in global path order (what the manifest's order and the slices
need), in batches, never all at once, and adds a group of listed files to a segment, checking
each against what was listed. A listed file is a ``Member`` whose ``segment`` is "" (not packed
yet) and whose ``etag`` is its identity: the S3 ETag, or a file's mtime in ns.

A directory is walked one directory at a time, each sorted by ``core.packed.sort_key`` (so
``a.txt`` comes before ``a/x``), skipping and counting symlinks, devices, FIFOs and sockets.
S3 lists keys in UTF-8 byte order, which is the manifest's order: a listing that is not (a
store that does not sort) is refused rather than packed wrongly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hpcstage.core.identity import ObjectRef
from hpcstage.core.packed import check_member_path, sort_key
from hpcstage.errors import PackError
from hpcstage.packed.manifest import Member
from hpcstage.packed.segments import SegmentWriter
from hpcstage.store.protocol import LEAN_MAX
from hpcstage.store.s3 import S3Store, download_bytes

BATCH = 10_000  # listed files handed over at a time
S3_MODE = 0o644  # S3 objects have no mode; staged files are read-only anyway


class Source(Protocol):
    """A directory or an S3 prefix, as ``hpcstage pack`` reads it."""

    @property
    def url(self) -> str:
        """Recorded in the plan and the version record."""
        ...

    skipped: int  # entries left out (symlinks, devices, FIFOs, directory markers)

    def listing(self) -> AsyncIterator[list[Member]]:
        """Every file, in path order, in batches."""
        ...

    async def add(self, writer: SegmentWriter, group: list[Member]) -> list[Member]:
        """Append ``group``'s bytes to ``writer``; their manifest rows."""
        ...


@dataclass
class DirSource:
    """A directory tree, read directly (as the user running the pack)."""

    root: Path
    skipped: int = 0

    @property
    def url(self) -> str:
        return str(self.root)

    async def listing(self) -> AsyncIterator[list[Member]]:
        if not self.root.is_dir():
            raise PackError(f"{self.root}: no such directory")
        walk = self._walk()
        while batch := await asyncio.to_thread(_take, walk, BATCH):
            yield batch

    def _walk(self) -> Iterator[Member]:
        stack: list[tuple[str, Iterator[os.DirEntry[str]]]] = [("", self._entries(self.root))]
        while stack:
            rel, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            path = rel + entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append((path + "/", self._entries(Path(entry.path))))
            elif entry.is_file(follow_symlinks=False):
                yield _file_member(check_member_path(path), entry.stat(follow_symlinks=False))
            else:
                self.skipped += 1

    def _entries(self, directory: Path) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(directory) as scan:
                found = list(scan)
        except OSError as exc:
            raise PackError(f"{directory}: cannot list it ({exc.strerror or exc})") from exc
        found.sort(key=lambda e: sort_key(e.name, e.is_dir(follow_symlinks=False)))
        return iter(found)

    async def add(self, writer: SegmentWriter, group: list[Member]) -> list[Member]:
        return await asyncio.to_thread(self._add, writer, group)

    def _add(self, writer: SegmentWriter, group: list[Member]) -> list[Member]:
        return [self._add_one(writer, m) for m in group]

    def _add_one(self, writer: SegmentWriter, listed: Member) -> Member:
        where = self.root / listed.path
        try:
            fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise PackError(f"{where}: cannot read it ({exc.strerror or exc})") from exc
        try:
            now = os.fstat(fd)
            if (now.st_size, str(now.st_mtime_ns)) != (listed.size, listed.etag):
                raise PackError(
                    f"{where} changed after it was listed: pack again with --restart"
                    " once the source is quiet"
                )
            return writer.add_fd(
                listed.path, fd, listed.size, listed.mode, listed.mtime_ns, listed.etag
            )
        finally:
            os.close(fd)


def _file_member(path: str, st: os.stat_result) -> Member:
    mode = stat.S_IMODE(st.st_mode)
    return Member(path, st.st_size, mode, st.st_mtime_ns, "", 0, 0, str(st.st_mtime_ns))


def _take(items: Iterator[Member], count: int) -> list[Member]:
    out: list[Member] = []
    for item in items:
        out.append(item)
        if len(out) >= count:
            break
    return out


@dataclass
class S3Source:
    """The objects under ``prefix`` (ending in "/") of one bucket, read with the user's own
    credentials; ``fetchers`` GETs at a time, the bytes kept in listing order."""

    store: S3Store
    prefix: str
    spool: Path  # where objects above LEAN_MAX wait on disk until they are added
    fetchers: int = 16
    skipped: int = 0
    _ids: int = field(default=0, repr=False)

    @property
    def url(self) -> str:
        return self.store.url(self.prefix)

    async def listing(self) -> AsyncIterator[list[Member]]:
        batch: list[Member] = []
        last = ""
        async for ref in self.store.list(self.prefix):
            path = ref.key[len(self.prefix) :]
            if not path or path.endswith("/"):  # a "directory marker" object
                self.skipped += 1
                continue
            if last and path <= last:
                raise PackError(
                    f"{self.url}: the store listed {path!r} after {last!r}; a pack needs"
                    " keys in order (S3 lists them so)"
                )
            last = path
            check_member_path(path)
            batch.append(Member(path, ref.size, S3_MODE, 0, "", 0, 0, ref.etag))
            if len(batch) >= BATCH:
                yield batch
                batch = []
        if batch:
            yield batch
        elif not last:
            await self._exists()

    async def _exists(self) -> None:
        async for _ in self.store.list(self.prefix.rstrip("/")):
            return
        raise PackError(f"{self.url}: no objects under this prefix")

    async def add(self, writer: SegmentWriter, group: list[Member]) -> list[Member]:
        window: deque[asyncio.Task[Path | bytes]] = deque()
        out: list[Member] = []
        try:
            for listed in group:
                window.append(asyncio.create_task(self._fetch(listed)))
                if len(window) >= self.fetchers:
                    out.append(self._write(writer, group[len(out)], await window.popleft()))
            while window:
                out.append(self._write(writer, group[len(out)], await window.popleft()))
        finally:
            for task in window:
                task.cancel()
            for task in window:
                with contextlib.suppress(BaseException):
                    result = await task
                    if isinstance(result, Path):
                        result.unlink(missing_ok=True)
        return out

    async def _fetch(self, listed: Member) -> Path | bytes:
        """The object's bytes, checked as every download is (count, ETag, MD5 or the store's
        checksum): in memory up to LEAN_MAX, else in a spool file."""
        ref = ObjectRef(
            self.store.store_id,
            self.store.bucket,
            self.prefix + listed.path,
            listed.etag,
            listed.size,
        )
        if listed.size <= LEAN_MAX:
            body, _ = await download_bytes(self.store, ref)
            return body
        self._ids += 1
        spool = self.spool / f"object-{os.getpid()}-{self._ids}"
        fd = os.open(spool, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            await self.store.download(ref, fd)
        except BaseException:
            spool.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return spool

    def _write(self, writer: SegmentWriter, listed: Member, got: Path | bytes) -> Member:
        if isinstance(got, bytes):
            if len(got) != listed.size:
                raise PackError(f"{self.url}{listed.path}: {len(got)} bytes, listed {listed.size}")
            return writer.add(listed.path, got, listed.mode, listed.mtime_ns, listed.etag)
        try:
            fd = os.open(got, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return writer.add_fd(
                    listed.path, fd, listed.size, listed.mode, listed.mtime_ns, listed.etag
                )
            finally:
                os.close(fd)
        finally:
            got.unlink(missing_ok=True)

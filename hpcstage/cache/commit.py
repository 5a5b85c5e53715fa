"""Putting verified objects into the node cache crash-safely, one at a time or in groups.

A download goes to ``<cache_id>.tmp-<random>`` next to its final place (``begin``); ``commit``
checks its size (and SHA-256 where given), fsyncs it, makes it read-only, renames it into place,
fsyncs the directory and only then writes the index row. Given ``unsynced`` (the boot id, see
``cache/durable.py``), ``commit`` skips both flushes: the object is readable at once from the
page cache and its row says it is not on disk yet, for the flusher to make it durable later.
Small objects (up to ``GROUP_COMMIT_MAX``) are committed in groups (``commit_group``): each is
written straight to its final place from memory or renamed there from its temp file, then one
syncfs(2) of the cache's filesystem and one index transaction cover the whole group, which is
what makes millions of small files affordable. A crash leaves a temp file or a file without a
row, both removed by the cache's reconcile and never returned by a lookup; no row ever names
partial bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpcstage.cache.index import Index, Row
from hpcstage.cache.layout import (
    NO_GUARD,
    OBJECT_MODE,
    TEMP_MARK,
    Guard,
    fsync_dir,
    make_dir,
    object_path,
)
from hpcstage.core.identity import ObjectRef
from hpcstage.errors import CacheError, FencedError
from hpcstage.store.libc import libc_function

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FINAL = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Partial bytes are private until committed; the committed object becomes OBJECT_MODE (0444).
_TEMP_MODE = 0o600
GROUP_COMMIT_MAX = 1 << 20  # objects up to this size are committed in groups (one flush)


@dataclass
class PendingObject:
    """An in-flight download: write the bytes to ``fd``, then ``commit`` or ``abort`` it."""

    ref: ObjectRef
    fd: int
    path: Path  # the temp file
    final: Path  # where commit() renames it
    closed: bool = False

    def close(self) -> None:
        """Close ``fd`` once; later calls do nothing."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)


@dataclass(frozen=True)
class SmallObject:
    """A small object's verified bytes in memory and their sha256, ready to be committed."""

    ref: ObjectRef
    body: bytes
    sha256_hex: str


GroupItem = SmallObject | tuple[PendingObject, str]


def item_ref(item: GroupItem) -> ObjectRef:
    """The object a group-commit item is about."""
    return item.ref if isinstance(item, SmallObject) else item[0].ref


class Committer:
    """Puts verified objects in place under ``objects/`` crash-safely and indexes them."""

    def __init__(
        self, objects: Path, index: Index, clock: Callable[[], float], guard: Guard = NO_GUARD
    ) -> None:
        self.objects = objects
        self._index = index
        self._clock = clock
        self._guard = guard  # held from the last check to the row (layout.Guard)

    def begin(self, ref: ObjectRef) -> PendingObject:
        """Create a private temp file next to ``ref``'s final place, for a download to fill."""
        final = object_path(self.objects, ref.cache_id)
        temp = final.with_name(f"{final.name}{TEMP_MARK}{secrets.token_hex(8)}")
        try:
            try:
                fd = os.open(temp, _CREATE, _TEMP_MODE)
            except FileNotFoundError:  # the first object of its fan-out directory
                make_dir(final.parent)
                fd = os.open(temp, _CREATE, _TEMP_MODE)
        except OSError as exc:
            raise CacheError(f"cannot start object {ref.cache_id}: {exc}") from exc
        return PendingObject(ref, fd, temp, final)

    def commit(self, pending: PendingObject, sha256_hex: str, unsynced: str = "") -> Path:
        """Make ``pending`` a complete, read-only, indexed object and return its path.

        ``unsynced`` "": flushed before the row is written; else the boot id to record in the
        row, whose bytes are left in the page cache. Raises CacheError (after aborting) if the
        size differs from ``ref.size``, the checksum is not 64 hex digits, or the disk fails.
        """
        flush = not unsynced
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self._guard())
            except BaseException:  # FencedError: nothing renamed; the temp file goes
                self.abort(pending)
                raise
            try:
                self._seal(pending, sha256_hex, flush=flush)
                os.rename(pending.path, pending.final)
                if flush:
                    fsync_dir(pending.final.parent)
            except BaseException as exc:
                self.abort(pending)
                if isinstance(exc, OSError):
                    raise CacheError(f"cannot commit object {pending.ref.cache_id}: {exc}") from exc
                raise
            self._index.put(self._new_row(pending.ref, sha256_hex, unsynced))
        return pending.final

    def commit_group(self, items: list[GroupItem]) -> list[Path | BaseException]:
        """``commit()`` for many small objects with one flush and one index transaction.

        Each item is either a finished download (checked, made read-only and renamed into
        place) or a ``SmallObject`` in memory (written straight to its final place, read-only).
        Then the cache's filesystem is synced once (syncfs(2); where that is missing, every
        file and directory is fsynced) and only then are the rows written, in one transaction.
        A crash before the rows leaves complete or partial files without a row, which
        ``reconcile()`` deletes and no lookup ever returns. Returns, per item, its object path
        or the exception that aborted it (every item: FencedError, when the cache has a newer
        leader epoch recorded than this agent's).
        """
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self._guard())
            except FencedError as exc:
                for item in items:
                    if not isinstance(item, SmallObject):
                        self.abort(item[0])
                return [exc for _ in items]
            return self._commit_group(items)

    def _commit_group(self, items: list[GroupItem]) -> list[Path | BaseException]:
        results: list[Path | BaseException] = []
        placed: list[tuple[int, ObjectRef, str, Path]] = []  # (index in results, ref, ...)
        group_sync = syncfs_available()
        for item in items:
            try:
                if isinstance(item, SmallObject):
                    final = self._write_final(item, flush=not group_sync)
                    ref, digest = item.ref, item.sha256_hex
                else:
                    pending, digest = item
                    ref, final = pending.ref, pending.final
                    self._seal_and_place(pending, digest, flush=not group_sync)
            except BaseException as exc:
                if isinstance(exc, OSError):
                    exc = CacheError(f"cannot commit object {item_ref(item).cache_id}: {exc}")
                results.append(exc)
                continue
            placed.append((len(results), ref, digest, final))
            results.append(final)
        if not placed:
            return results
        try:
            if group_sync:
                syncfs(self.objects)
            else:
                for parent in {final.parent for *_, final in placed}:
                    fsync_dir(parent)
            self._index.put_many([self._new_row(ref, digest) for _, ref, digest, _ in placed])
        except (OSError, sqlite3.Error) as exc:
            failed = CacheError(f"cannot commit {len(placed)} objects: {exc}")
            for index, _, _, final in placed:
                final.unlink(missing_ok=True)
                results[index] = failed
        return results

    def _seal_and_place(self, pending: PendingObject, digest: str, flush: bool) -> None:
        try:
            self._seal(pending, digest, flush=flush)
            os.rename(pending.path, pending.final)
        except BaseException:
            self.abort(pending)
            raise

    def _write_final(self, obj: SmallObject, flush: bool) -> Path:
        """Write ``obj`` to its final place, read-only; it counts only once indexed."""
        ref = obj.ref
        _check_complete(ref, len(obj.body), obj.sha256_hex)
        final = object_path(self.objects, ref.cache_id)
        fd = -1
        for _ in range(3):
            try:
                fd = os.open(final, _CREATE_FINAL, OBJECT_MODE)
                break
            except FileNotFoundError:  # the first object of its fan-out directory
                make_dir(final.parent)
            except FileExistsError:
                # No row names it (lookup missed and fetches are single-flight): a leftover of
                # a crash or of an object removed from the index. Never served: replace it.
                final.unlink()
        if fd < 0:
            raise CacheError(f"cannot create object {ref.cache_id}")
        try:
            view = memoryview(obj.body)
            while view:
                view = view[os.write(fd, view) :]
            stamp_mtime(fd, ref)
            if flush:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            final.unlink(missing_ok=True)
            raise
        os.close(fd)
        return final

    def abort(self, pending: PendingObject) -> None:
        """Drop an in-flight download: close and delete its temp file (idempotent)."""
        try:
            pending.close()
        finally:
            pending.path.unlink(missing_ok=True)

    def _seal(self, pending: PendingObject, sha256_hex: str, flush: bool = True) -> None:
        """Check a finished download, flush it to disk (unless ``flush`` is False: the caller
        syncs the whole group) and make it read-only."""
        if pending.closed:
            raise CacheError(f"object {pending.ref.cache_id} was already committed or aborted")
        _check_complete(pending.ref, os.fstat(pending.fd).st_size, sha256_hex)
        stamp_mtime(pending.fd, pending.ref)
        if flush:
            os.fsync(pending.fd)
        os.fchmod(pending.fd, OBJECT_MODE)
        pending.close()

    def _new_row(self, ref: ObjectRef, sha256_hex: str, unsynced: str = "") -> Row:
        now = self._clock()
        r = ref
        return Row(
            r.cache_id, r.store, r.bucket, r.key, r.etag, r.size, sha256_hex, now, now, unsynced
        )


def stamp_mtime(fd: int, ref: ObjectRef) -> None:
    """Give the object's file the store's Last-Modified as its mtime (where the store gave
    one). Every view links this one inode, so a staged file shows the object's time, as
    ``aws s3 cp``/``s5cmd`` leave it; the atime stays the time of the fetch."""
    if ref.last_modified_ns is not None:
        os.utime(fd, ns=(time.time_ns(), ref.last_modified_ns))


def syncfs_available() -> bool:
    """True where syncfs(2) exists (Linux)."""
    return _SYNCFS is not None


def syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` (syncfs(2)); OSError on a reported write error."""
    assert _SYNCFS is not None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")
    finally:
        os.close(fd)


_SYNCFS = libc_function("syncfs", ctypes.c_int)


def _check_complete(ref: ObjectRef, size: int, sha256_hex: str) -> None:
    """CacheError unless ``size`` bytes are what ``ref`` lists and the digest looks like one.

    Objects up to GROUP_COMMIT_MAX must come with their SHA-256 (peer copy checks it); bigger
    ones may come without ("": downloads do not hash them twice, see hpcstage.store.s3)."""
    if not _SHA256.fullmatch(sha256_hex) and (sha256_hex or ref.size <= GROUP_COMMIT_MAX):
        raise CacheError(f"not a sha256 hex digest: {sha256_hex!r}")
    if size != ref.size:
        raise CacheError(f"object {ref.key!r} has {size} bytes, expected {ref.size}")

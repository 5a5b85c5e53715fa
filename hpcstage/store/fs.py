"""The shared-filesystem store: absolute paths under a root, behind the object-store contract."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from pathlib import Path
from stat import S_ISREG
from types import TracebackType
from typing import Final, Self, TypeVar

from hpcstage.core.identity import ObjectRef
from hpcstage.errors import (
    CredentialError,
    ObjectChangedError,
    ObjectMissingError,
    StoreError,
    TransientStoreError,
)
from hpcstage.retry import DEFAULT_RETRY, OnRetry, RetryPolicy, with_retries
from hpcstage.store.libc import FILE_CHUNK
from hpcstage.store.parts import PartProgress, pwrite_hashed
from hpcstage.store.protocol import LEAN_MAX, DownloadResult, Progress
from hpcstage.store.tempfiles import (
    abandon_temp,
    copy_file,
    finish_temp,
    open_temp,
    unlink_if_there,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


# Errors a network filesystem (NFS, Lustre, GPFS) returns while a server fails over.
_TRANSIENT_ERRNOS: Final = frozenset(
    {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ENOLCK}
    | {errno.ECONNRESET, errno.ECONNREFUSED, errno.EHOSTDOWN, errno.EHOSTUNREACH}
)


def translate_fs_error(exc: OSError, where: str) -> StoreError:
    """Map an OSError on the shared filesystem to the hpcstage tree; ``where`` is "OP path"."""
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return ObjectMissingError(f"{where}: no such file")
    if isinstance(exc, PermissionError):
        return CredentialError(f"{where}: permission denied")
    message = f"{where}: {exc.strerror or exc}"
    if exc.errno in _TRANSIENT_ERRNOS:
        return TransientStoreError(message)
    return StoreError(message)


class FsStore:
    """Absolute paths under ``root`` on a shared filesystem, behind the same contract.

    Keys are absolute paths; ``ObjectRef.etag`` is the mtime in nanoseconds. Paths with ``..``
    and symlinks that resolve outside ``root`` are refused; listing skips such symlinks and does
    not descend into symlinked directories (they can form cycles). Writes go to a temporary
    file that is fsynced and renamed into place. Blocking calls run in threads: metadata
    operations on a busy parallel filesystem can take a while.
    """

    store_id: Final = "file"

    def __init__(
        self, root: Path, *, retry: RetryPolicy = DEFAULT_RETRY, on_retry: OnRetry | None = None
    ) -> None:
        if not root.is_absolute():
            raise ValueError(f"{root}: the root of a filesystem store must be absolute")
        self.root = Path(os.path.normpath(root))
        self._real_root = Path(os.path.realpath(root))
        self._retry = retry
        self._on_retry = on_retry

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Nothing to release: every file is closed when its call ends."""

    def url(self, key: str) -> str:
        """The key itself: an absolute path."""
        return key

    def _checked(self, key: str) -> Path:
        """The real path of ``key``, after refusing relative paths, '..' and escapes from root."""
        path = Path(key)
        if not path.is_absolute() or ".." in path.parts:
            raise StoreError(f"{key}: expected an absolute path without '..'")
        if not path.is_relative_to(self.root):
            raise StoreError(f"{key}: outside the store's root {self.root}")
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self._real_root):
            raise StoreError(f"{key}: a symlink leads outside {self.root}")
        return real

    def _ref(self, key: str, stat: os.stat_result) -> ObjectRef:
        mtime = stat.st_mtime_ns
        return ObjectRef(self.store_id, "", key, str(mtime), stat.st_size, "", mtime)

    async def _retried(self, op: str, key: str, attempt: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(self._retry, f"{op} {key}", attempt, self._on_retry)

    async def _fs(self, op: str, key: str, fn: Callable[[], T]) -> T:
        """Run a blocking filesystem call in a thread, its OSError translated; no retry."""
        try:
            return await asyncio.to_thread(fn)
        except OSError as exc:
            raise translate_fs_error(exc, f"{op} {key}") from exc

    # -- list / head ---------------------------------------------------------------------------

    async def list(self, prefix: str, *, batch: int = 1000) -> AsyncIterator[ObjectRef]:
        """Walk the files whose path starts with ``prefix`` (string prefix, as on S3).

        The walk is one generator advanced ``batch`` entries per thread hop, so a tree of 10^6
        files streams with flat memory and a slow metadata server never blocks the loop. A
        missing directory lists nothing, as an empty S3 prefix does. A failure ends the listing
        (a half-walked generator cannot be resumed, so the listing is not retried).
        """
        if prefix == str(self.root):
            prefix += "/"  # the root itself: its files (nothing beside it belongs to this store)
        directory, _, stem = prefix.rpartition("/")
        start = await asyncio.to_thread(self._checked, directory or "/")
        walk = self._walk(str(start), directory or "/", stem)
        try:
            while refs := await self._fs("list", prefix, lambda: _take(walk, batch)):
                for ref in refs:
                    yield ref
        finally:
            walk.close()  # closes the scandir iterators (directory fds) of an abandoned walk

    def _walk(self, real_dir: str, key_dir: str, stem: str) -> Generator[ObjectRef, None, None]:
        try:
            entries = os.scandir(real_dir)
        except (FileNotFoundError, NotADirectoryError):
            return
        with entries:
            for entry in entries:
                if entry.name.startswith(stem):
                    yield from self._entry(entry, os.path.join(key_dir, entry.name))

    def _entry(self, entry: os.DirEntry[str], key: str) -> Iterator[ObjectRef]:
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(entry.path, key, "")
            elif entry.is_symlink():
                yield from self._symlink(entry, key)
            elif entry.is_file(follow_symlinks=False):
                yield self._ref(key, entry.stat(follow_symlinks=False))
        except FileNotFoundError:
            pass  # deleted while we walked: a listing is a snapshot, and it was not there

    def _symlink(self, entry: os.DirEntry[str], key: str) -> Iterator[ObjectRef]:
        real = Path(os.path.realpath(entry.path))
        if not real.is_relative_to(self._real_root):
            log.warning("%s: skipped, a symlink leading outside %s", key, self.root)
            return
        stat = real.stat()
        if S_ISREG(stat.st_mode):
            yield self._ref(key, stat)

    async def head(self, key: str, *, version_id: str = "") -> ObjectRef:
        """The file's identity from stat() (a file has no versions: ``version_id`` must be "")."""
        if version_id:
            raise StoreError(f"head {key}: a file has no version {version_id!r}")
        real = await asyncio.to_thread(self._checked, key)
        stat = await self._retried("head", key, lambda: self._fs("head", key, real.stat))
        if not S_ISREG(stat.st_mode):
            raise StoreError(f"head {key}: not a regular file")
        return self._ref(key, stat)

    # -- download ------------------------------------------------------------------------------

    async def download(
        self, ref: ObjectRef, dest_fd: int, *, progress: Progress | None = None
    ) -> DownloadResult:
        """Copy the file into ``dest_fd`` with pread/pwrite, hashing as it goes."""
        if ref.store != self.store_id:
            raise ValueError(f"{ref} does not belong to a filesystem store")
        real = await asyncio.to_thread(self._checked, ref.key)
        tracker = PartProgress(progress)
        return await self._retried(
            "read", ref.key, lambda: self._copy_out(ref, real, dest_fd, tracker)
        )

    async def read_range(self, ref: ObjectRef, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of the file ``ref`` (see S3Store.read_range)."""
        if length <= 0 or start < 0 or start + length > ref.size:
            raise ValueError(f"range {start}+{length} outside {ref.key} ({ref.size} B)")
        real = await asyncio.to_thread(self._checked, ref.key)

        def read() -> bytes:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                stat = os.fstat(fd)
                if (str(stat.st_mtime_ns), stat.st_size) != (ref.etag, ref.size):
                    raise ObjectChangedError(f"read {ref.key}: the file changed since listed")
                return os.pread(fd, length, start)
            finally:
                os.close(fd)

        data = await self._retried("read", ref.key, lambda: self._fs("read", ref.key, read))
        if len(data) != length:
            raise TransientStoreError(f"read {ref.key}: truncated at {start + len(data)}")
        return data

    async def _copy_out(
        self, ref: ObjectRef, real: Path, dest_fd: int, tracker: PartProgress
    ) -> DownloadResult:
        # O_NOFOLLOW: a symlink swapped in after _checked() is refused, not followed.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        src = await self._fs("open", ref.key, lambda: os.open(real, flags))
        try:
            await self._check_same(ref, src)
            sha256 = hashlib.sha256() if ref.size <= LEAN_MAX else None
            hashers = [sha256] if sha256 is not None else []
            got = await _copy_loop(
                lambda n, off: self._fs("read", ref.key, lambda: os.pread(src, n, off)),
                lambda data, off: asyncio.to_thread(pwrite_hashed, dest_fd, data, off, hashers),
                ref.size,
                lambda done: tracker.update(0, done),
            )
            await self._check_same(ref, src)  # changed while we copied?
        finally:
            os.close(src)
        if got != ref.size:
            raise TransientStoreError(f"read {ref.key}: truncated: got {got} of {ref.size} bytes")
        # A file has nothing to check content against (no ETag, no checksum): size and mtime.
        return DownloadResult(sha256.hexdigest() if sha256 is not None else "", got, "")

    async def _check_same(self, ref: ObjectRef, fd: int) -> None:
        stat = await self._fs("stat", ref.key, lambda: os.fstat(fd))
        if (str(stat.st_mtime_ns), stat.st_size) != (ref.etag, ref.size):
            raise ObjectChangedError(f"read {ref.key}: the file changed since it was listed")

    # -- upload / copy / delete ----------------------------------------------------------------

    async def upload(self, path: Path, key: str, *, progress: Progress | None = None) -> ObjectRef:
        """Copy the local file ``path`` to ``key``: temp file, fsync, rename."""
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # the caller's file: OSError as is
        try:
            return await self.upload_fd(src, key, progress=progress)
        finally:
            os.close(src)

    async def upload_fd(self, fd: int, key: str, *, progress: Progress | None = None) -> ObjectRef:
        """``upload`` of the file open as ``fd``."""
        dest = await asyncio.to_thread(self._checked, key)
        tracker = PartProgress(progress)
        size = os.fstat(fd).st_size
        await self._retried("write", key, lambda: self._write(key, dest, fd, size, tracker))
        return await self.head(key)

    async def _write(
        self, key: str, dest: Path, src: int, size: int, tracker: PartProgress
    ) -> None:
        fd, tmp = await self._fs("create", key, lambda: open_temp(dest))
        try:
            got = await _copy_loop(
                lambda n, off: asyncio.to_thread(os.pread, src, n, off),
                lambda data, off: self._fs("write", key, lambda: pwrite_hashed(fd, data, off, ())),
                size,
                lambda done: tracker.update(0, done),
            )
            if got != size:
                raise OSError(errno.EIO, f"the source shrank while uploading it ({got}/{size})")
        except BaseException:
            abandon_temp(fd, tmp)
            raise
        await self._fs("write", key, lambda: finish_temp(fd, tmp, dest))

    async def copy(self, src_key: str, dst_key: str) -> None:
        """Copy one file to another path under root (in the kernel), then rename into place."""
        src = await asyncio.to_thread(self._checked, src_key)
        dest = await asyncio.to_thread(self._checked, dst_key)
        await self._retried(
            "copy", src_key, lambda: self._fs("copy", src_key, lambda: copy_file(src, dest))
        )

    async def delete(self, key: str) -> None:
        """Unlink the file; a missing one is fine."""
        real = await asyncio.to_thread(self._checked, key)
        await self._retried(
            "delete", key, lambda: self._fs("delete", key, lambda: unlink_if_there(real))
        )


def _take(items: Iterator[T], count: int) -> Sequence[T]:
    """The next ``count`` items (fewer at the end, none when exhausted)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= count:
            break
    return batch


async def _copy_loop(
    read: Callable[[int, int], Awaitable[bytes]],
    write: Callable[[bytes, int], Awaitable[None]],
    size: int,
    on_done: Callable[[int], None],
) -> int:
    """Copy ``size`` bytes chunk by chunk through ``read``/``write``; return the count copied."""
    offset = 0
    while offset < size:
        data = await read(min(FILE_CHUNK, size - offset), offset)
        if not data:
            break
        await write(data, offset)
        offset += len(data)
        on_done(offset)
    return offset

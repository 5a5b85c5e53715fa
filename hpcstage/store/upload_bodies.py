"""What an upload sends: request bodies read from the file with pread, their Content-MD5, and
a cap on the bytes held in memory at once."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import os
from collections.abc import AsyncIterator
from typing import Any

from hpcstage.store.libc import FILE_CHUNK
from hpcstage.store.protocol import MIB
from hpcstage.store.verify import new_md5


class MemoryBudget:
    """Caps the upload bytes held in memory at once; one request larger than the cap runs alone.

    An object below the multipart threshold is read into memory to send it with its
    Content-MD5, so without this 64 transfers of 256 MiB objects would hold 16 GiB. (Parts of
    bigger objects are streamed from the file: they hold no more than a read each.)
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._freed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def reserve(self, size: int) -> AsyncIterator[None]:
        """Hold ``size`` bytes of the budget for the ``async with`` block."""
        while self._used and self._used + size > self._limit:
            self._freed.clear()
            await self._freed.wait()
        self._used += size
        try:
            yield
        finally:
            # Synchronous on purpose: a cancelled task still gives its bytes back.
            self._used -= size
            self._freed.set()


def read_with_md5(fd: int, offset: int, length: int) -> tuple[bytes, bytes]:
    """Read ``length`` bytes at ``offset`` and their MD5 digest (for Content-MD5)."""
    chunks: list[bytes] = []
    done = 0
    while done < length:
        chunk = os.pread(fd, min(FILE_CHUNK, length - done), offset + done)
        if not chunk:
            raise OSError(errno.EIO, f"file shrank while uploading it (short by {length - done})")
        chunks.append(chunk)
        done += len(chunk)
    data = b"".join(chunks)
    return data, hashlib.md5(data, usedforsecurity=False).digest()


def md5_of_range(fd: int, offset: int, length: int) -> bytes:
    """The MD5 digest of ``length`` bytes at ``offset`` (for a streamed part's Content-MD5)."""
    md5, done = new_md5(), 0
    while done < length:  # 1 MiB reads: parts hash in parallel, each holding one read
        chunk = os.pread(fd, min(MIB, length - done), offset + done)
        if not chunk:
            raise OSError(errno.EIO, f"file shrank while uploading it (short by {length - done})")
        md5.update(chunk)
        done += len(chunk)
    return bytes(md5.digest())


class FileRange(io.RawIOBase):
    """``length`` bytes of the file open as ``fd`` from ``offset``, as a seekable stream:
    what an upload sends (and sends again on a retry) is read from the file as it goes, with
    pread (no shared offset: parts of one fd stream in parallel). Closing it leaves ``fd``."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd, self._offset, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._length - self._pos)
        if want <= 0:
            return 0
        got = os.preadv(self._fd, [memoryview(buffer)[:want]], self._offset + self._pos)
        if not got:
            raise OSError(errno.EIO, "file shrank while uploading it")
        self._pos += got
        return got

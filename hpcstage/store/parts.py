"""A transfer in parts: splitting an object, running the parts a bounded number at a time,
counting their progress once, and hashing parts that land out of order in file order."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from hpcstage.errors import TransientStoreError
from hpcstage.store.libc import FILE_CHUNK, pwrite_all, start_writeback
from hpcstage.store.protocol import Progress

Item = TypeVar("Item")

S3_MAX_PARTS: Final = 10_000
READ_BACK_PARTS: Final = 4  # parts of one object in flight when it is hashed in order


@dataclass(frozen=True)
class Part:
    """One part of an object: its S3 part number, first byte and length."""

    number: int  # 1-based, as S3 numbers parts
    offset: int
    length: int


def split_parts(size: int, part_size: int) -> Sequence[Part]:
    """Split ``size`` bytes into ``part_size`` parts, grown if needed to fit S3's 10,000 parts."""
    part_size = max(part_size, math.ceil(size / S3_MAX_PARTS))
    count = max(1, math.ceil(size / part_size))
    return [Part(n + 1, n * part_size, min(part_size, size - n * part_size)) for n in range(count)]


class PartProgress:
    """Turns 'part N has D bytes done' into deltas, so a retried part is never counted twice.

    ``landed`` (optional) hears every report as it is (the part's attempt has written its
    first D bytes), and ``restart`` that a part is fetched again from its first byte."""

    def __init__(
        self,
        callback: Progress | None,
        landed: Callable[[int, int], None] | None = None,
        restart: Callable[[int], None] | None = None,
    ) -> None:
        self._callback = callback
        self._landed = landed
        self._restart = restart
        self._done: dict[int, int] = {}

    def update(self, part: int, done: int) -> None:
        """Part ``part``'s current attempt has ``done`` bytes; report what is new."""
        if self._landed is not None:
            self._landed(part, done)
        previous = self._done.get(part, 0)
        if done > previous:
            self._done[part] = done
            if self._callback is not None:
                self._callback(done - previous)

    def restart(self, part: int) -> None:
        """Part ``part`` is fetched again from its first byte."""
        if self._restart is not None:
            self._restart(part)


async def run_bounded(
    items: Iterable[Item], fn: Callable[[Item], Awaitable[None]], limit: int
) -> None:
    """Run ``fn`` on every item, at most ``limit`` at a time (a worker pool, not one task each).

    The first failure cancels the others and is raised as itself, not as an ExceptionGroup.
    """
    shared = iter(items)

    async def worker() -> None:
        for item in shared:  # one iterator shared by all workers: each item is taken once
            await fn(item)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, limit)):
                group.create_task(worker())
    except BaseExceptionGroup as failures:
        first = failures.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from first.__cause__  # keep the vendor error as the cause


def pwrite_hashed(fd: int, data: bytes | bytearray, offset: int, hashers: Iterable[Any]) -> None:
    """Write all of ``data`` at ``offset`` and hash it."""
    pwrite_all(fd, data, offset)
    for hasher in hashers:
        hasher.update(data)


class InOrderHash:
    """Checksums of a file whose parts land out of order (``hashers``: objects with update()).

    The bytes are hashed in file order, read back from the page cache in threads, as soon as
    they are written: the part being hashed is followed as its bytes land (each part is
    written front to back by one attempt), so hashing overlaps the download instead of
    following it. What is hashed also starts on its way to disk (the lean ranged GET already
    started most of it as it wrote; the SDK's fallback path did not).

    A part fetched again after some of its bytes were hashed (the SDK's retry of a failed
    ranged GET) would be checked by bytes since overwritten: ``finish`` then raises
    TransientStoreError, and the object is fetched again whole.
    """

    def __init__(
        self, fd: int, parts: Sequence[Part], hashers: Sequence[Any], writeback: bool = True
    ) -> None:
        self._fd = fd
        self._writeback = writeback  # start writeback of each part once hashed (see PartSink)
        self._parts = parts
        self._hashers = hashers
        self._landed: dict[int, int] = {}  # part number -> bytes its attempt has written
        self._current = 0  # the part being hashed (0: none yet)
        self._hashed = 0  # its bytes hashed so far
        self._reading = False  # its bytes are being read (hashed) since it became current
        self._refetched = 0  # a part fetched again after being (partly) hashed
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def landed(self, number: int, done: int) -> None:
        """Part ``number``'s current attempt has written its first ``done`` bytes."""
        if not self._hashers and (not self._writeback or done < self._parts[number - 1].length):
            return  # only writeback to start (if any): by whole parts
        self._landed[number] = done
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="hash-in-order")

    def part_done(self, part: Part) -> None:
        """``part`` is completely written."""
        self.landed(part.number, part.length)

    def restart(self, number: int) -> None:
        """Part ``number`` is fetched again from its first byte."""
        self._landed.pop(number, None)
        if number < self._current or (number == self._current and self._reading):
            self._refetched = self._refetched or number

    async def _run(self) -> None:
        for part in self._parts:
            self._current, self._hashed, self._reading = part.number, 0, False
            while self._hashed < part.length:
                upto = self._landed.get(part.number, 0)
                if upto <= self._hashed:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                start, length = part.offset + self._hashed, upto - self._hashed
                self._reading = True
                # One thread per checksum (hashlib and awscrt release the GIL), each reading
                # the page cache itself.
                work = [asyncio.to_thread(self._hash, h, start, length) for h in self._hashers]
                if self._writeback:
                    work.append(asyncio.to_thread(start_writeback, self._fd, start, length))
                await asyncio.gather(*work)
                self._hashed = upto

    def _hash(self, hasher: Any, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            chunk = os.pread(self._fd, min(FILE_CHUNK, end - offset), offset)
            if not chunk:
                raise OSError(errno.EIO, "file shorter than what was written to it")
            hasher.update(chunk)
            offset += len(chunk)

    async def finish(self, url: str) -> None:
        """Return once every part has landed and been hashed (``url`` names the object)."""
        if not self._hashers and not self._writeback:
            return  # nothing to do in part order: the parts were all written when this is called
        if self._task is None:  # no parts (cannot happen for multipart sizes): hash nothing
            self._task = asyncio.create_task(self._run())
        await self._task
        if self._refetched and self._hashers:
            raise TransientStoreError(
                f"{url}: part {self._refetched} was fetched again after its first bytes were"
                " checked; fetching the object again"
            )

    async def cancel(self) -> None:
        """Stop hashing (after a failed download); no-op once finished."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

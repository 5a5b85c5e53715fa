"""Low-level file writing: Linux system calls Python's ``os`` module lacks (looked up once in
the C library), how big buffers go into the page cache, and writing around it (O_DIRECT)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

if TYPE_CHECKING:  # type only: importing checksums loads awscrt
    from hpcstage.store.checksums import Checksummer

# Bytes per pwrite(2) when a big buffer goes into the page cache. Bigger writes get bigger
# folios, and the kernel's copy into freshly allocated page-cache memory
# (copy_folio_from_iter_atomic) then dominated the CPU of a big download; much smaller writes
# were slower again. A measured choice: see docs/benchmarks.md, "What changed since the first
# run", item 10. s5cmd writes 32 KiB at a time.
WRITE_SLICE: Final = 256 * 1024

# Bytes per pread/pwrite/sendfile call of local and shared-filesystem copies and read-backs.
FILE_CHUNK: Final = 8 * 2**20


def libc_function(name: str, *argtypes: Any) -> Callable[..., int] | None:
    """The C library's ``name`` taking ``argtypes`` and returning an int (errno kept for
    ``ctypes.get_errno``), or None where it does not exist (not Linux/glibc): callers then
    do without it."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return cast("Callable[..., int]", function)


_SYNC_FILE_RANGE = libc_function(
    "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
)
_SYNC_FILE_RANGE_WRITE = 2


_FALLOCATE = libc_function(
    "fallocate64", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64
) or libc_function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_NO_ROOM: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes of disk for ``fd``'s file and make it that long (Linux
    fallocate(2), mode 0: blocks allocated, reading as zeros until written).

    A big download then fails at once when the disk (or a quota) has no room for it, rather
    than after fetching most of it, and its parts are written into allocated blocks (with
    O_DIRECT on ext4 that is faster and costs less CPU: docs/benchmarks.md, item 14). Raises
    OSError only for no room (ENOSPC, EDQUOT, EFBIG); a file system without fallocate
    (EOPNOTSUPP) or any other refusal leaves the file as it was (never zero-filled by hand,
    as posix_fallocate would).
    """
    if _FALLOCATE is None or size <= 0:
        return
    if _FALLOCATE(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err in _NO_ROOM:
            raise OSError(err, f"{os.strerror(err)} (reserving {size} bytes for a download)")


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``fd``'s dirty pages in the range to disk, without waiting (Linux
    sync_file_range(2)); a hint only: durability still comes from fsync, errors are its."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` to ``fd`` at ``offset``, ``WRITE_SLICE`` bytes per call (pwrite
    may also write less than asked: the rest follows)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view[:WRITE_SLICE], offset)
        view, offset = view[written:], offset + written


# --------------------------------------------------------------------------------------------
# Writing around the page cache (O_DIRECT)
# --------------------------------------------------------------------------------------------

# O_DIRECT wants the file offset, the length and the memory address aligned to the device's
# logical block size: 512 or 4096 bytes on the disks of compute nodes; 4096 (a page) covers
# both. A file system that wants more refuses the write (EINVAL) and the page cache takes it.
DIRECT_ALIGN: Final = 4096


# open_direct's errors that mean "not here, not ever": the file system has no O_DIRECT
# (EINVAL, EOPNOTSUPP) or there is no /proc to reopen the file through (ENOENT).
DIRECT_UNSUPPORTED: Final = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT})


def open_direct(fd: int) -> int:
    """A second descriptor, write-only and O_DIRECT, of the file ``fd`` is open on (through
    /proc/self/fd), or -1 on a platform without O_DIRECT. OSError where it cannot be opened:
    ``DIRECT_UNSUPPORTED`` errors will not go away; others (EMFILE, ...) may."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC | flag)


def aligned_buffer(size: int) -> mmap.mmap:
    """A fresh page-aligned buffer of ``size`` bytes (anonymous memory, as O_DIRECT wants);
    unmapped when the last reference to it (or a memoryview of it) goes."""
    return mmap.mmap(-1, size)


class PartSink:
    """Where the bytes of one part of a file go, in order: ``fd`` (through the page cache), or
    ``direct_fd`` (the same file opened O_DIRECT, see ``open_direct``; -1: none) for every
    aligned run of them; ``checksum`` (optional) sees every byte as it passes.

    Written straight to disk, a big download costs much less CPU (docs/benchmarks.md, item
    12): no copy into freshly allocated page-cache memory, no reading back to checksum it,
    little left for the fsync.
    A direct write the file system refuses (EINVAL: an alignment it wants and we do not give)
    goes through ``fd`` instead, and so does the rest of the part (``direct_refused`` says
    why). Not thread-safe: one sink per part and thread.
    """

    def __init__(
        self,
        fd: int,
        direct_fd: int = -1,
        checksum: Checksummer | None = None,
        writeback: bool = True,
    ) -> None:
        self.fd = fd
        self.direct_fd = direct_fd
        self.checksum = checksum
        # Start writing what lands through the page cache to disk at once (start_writeback):
        # only worth it when the object is flushed before anyone may read it.
        self.writeback = writeback
        self.direct_bytes = 0  # written with O_DIRECT
        self.direct_refused: OSError | None = None

    def write(self, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset``. With O_DIRECT, ``data`` must start on a page
        (an ``aligned_buffer``); only its aligned head goes direct when ``offset`` is aligned."""
        if self.checksum is not None:
            self.checksum.update(data)
        if self.direct_fd >= 0 and offset % DIRECT_ALIGN == 0:
            aligned = len(data) - len(data) % DIRECT_ALIGN
            if aligned:
                written = self._direct(data[:aligned], offset)
                data, offset = data[written:], offset + written
        if data:
            pwrite_all(self.fd, data, offset)

    def _direct(self, data: memoryview, offset: int) -> int:
        try:
            written = os.pwrite(self.direct_fd, data, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct_fd, self.direct_refused = -1, exc
            return 0
        self.direct_bytes += written
        if written % DIRECT_ALIGN:  # a short write off the alignment: the rest goes buffered
            self.direct_fd = -1
        return written

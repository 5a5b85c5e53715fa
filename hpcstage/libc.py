"""Low-level file writing: Linux system calls Python's ``os`` module lacks (looked up once in
the C library), and how big buffers go into the page cache."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any, Final, cast

# Bytes per pwrite(2) when a big buffer goes into the page cache. Measured on a 2-core VM
# (benchmarks/stagein.py's machine, Linux 6.18, ext4): 16 threads writing 1 GiB into two
# files took 2.84 s (median of 5) in 1 MiB writes and 1.92 s in 256 KiB writes, 64 KiB
# writes were slower again; the kernel's copy into freshly allocated page-cache memory
# (copy_folio_from_iter_atomic) was 30% of all CPU with 1 MiB writes. s5cmd writes 32 KiB
# at a time.
WRITE_SLICE: Final = 256 * 1024


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

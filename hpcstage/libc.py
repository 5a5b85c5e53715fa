"""Linux system calls Python's ``os`` module lacks, looked up once in the C library."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any, cast


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

"""Writing a file crash-safely: a temp file beside it, fsynced, renamed into place, the
directory fsynced; a temp file abandoned on any failure."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from hpcstage.store.libc import FILE_CHUNK


def open_temp(dest: Path) -> tuple[int, Path]:
    """A fresh temp file beside ``dest`` (same directory, so the rename is atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.hpcstage-tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(tmp, flags, 0o644), tmp


def finish_temp(fd: int, tmp: Path, dest: Path) -> None:
    """fsync and close ``fd``, rename over ``dest``, fsync the directory; else remove ``tmp``."""
    try:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
        dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        unlink_if_there(tmp)
        raise


def abandon_temp(fd: int, tmp: Path) -> None:
    """Close and remove a temp file after a failed write (errors ignored: it is litter)."""
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        tmp.unlink()


def copy_file(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` in the kernel, through a temp file renamed into place."""
    fd, tmp = open_temp(dest)
    try:
        source = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _sendfile_all(source, fd)
        finally:
            os.close(source)
    except BaseException:
        abandon_temp(fd, tmp)
        raise
    finish_temp(fd, tmp, dest)


def _sendfile_all(src: int, dst: int) -> None:
    # In-kernel copy: the bytes never enter Python (shutil.copyfile does the same on Linux).
    while os.sendfile(dst, src, None, FILE_CHUNK):
        pass


def unlink_if_there(path: Path) -> None:
    """Remove ``path``; a missing one is fine."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

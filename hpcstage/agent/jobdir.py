"""A finished job's directory, read for stage-out without letting its user steer a read.

The agent's service account may read every job directory on the node (the ACLs give it that),
and the job's user may still rename things inside theirs while it is read (a second job or a
login holding a directory there as its cwd outlives the revoked ACL). So no path is ever
resolved: the walk and every open go one component at a time from a directory fd, each opened
with O_NOFOLLOW, so a directory or file swapped for a symlink fails the open instead of being
followed. A file is opened with O_NONBLOCK (a FIFO swapped in for it cannot block the agent)
and judged on its fd (``stageout.file_problem``: a regular file on the job directory's file
system, owned by the job's user). Its caller hashes, uploads and caches from that one fd.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pwd
import stat
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Self

from hpcstage.core.packed import sort_key
from hpcstage.core.stageout import (
    Output,
    Refused,
    Skipped,
    file_problem,
    key_for,
    name_problem,
    shown,
)
from hpcstage.errors import HpcstageError, UnsafeFileError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# Directories below SRC the walk enters; each level holds one fd while the walk is under it.
MAX_DEPTH = 256
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Owners:
    """Whose files a job's outputs may be: its user's (and inputs the cache linked in)."""

    job_uid: int
    service_uid: int

    @classmethod
    def of(cls, user: str) -> Owners:
        """The owners for a job of ``user`` ("" or our own name: a job of the service account)."""
        me = os.geteuid()
        if not user:
            return cls(me, me)
        try:
            return cls(pwd.getpwnam(user).pw_uid, me)
        except KeyError as exc:
            raise HpcstageError(f"unknown user {user!r}: cannot check its outputs") from exc


class JobDir:
    """One job's directory, open as a directory fd, for walking and opening its outputs."""

    def __init__(self, view: Path, owners: Owners) -> None:
        self.owners = owners
        self.fd = os.open(view, _DIR)
        self.dev = os.fstat(self.fd).st_dev

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- walk ----------------------------------------------------------------------------

    def walk(self, src: PurePosixPath, dest_key: str) -> Iterator[Output | Skipped | Refused]:
        """What is under ``src``: files to upload, things skipped and files refused, by name.

        Symlinks are not followed (skipped), nor are devices, FIFOs and sockets; files that
        are not the job user's, sit on another file system, or whose names are not UTF-8 are
        refused. HpcstageError if SRC itself is missing or leaves the job directory.
        """
        if ".." in src.parts or src.is_absolute():
            raise HpcstageError(f"stage-out source {src} leaves the job directory")
        with ExitStack() as opened:
            parent = self.fd
            for depth, part in enumerate(src.parts):
                st = self._lstat_source(src, parent, part)
                if not stat.S_ISDIR(st.st_mode):
                    if depth < len(src.parts) - 1:
                        raise HpcstageError(
                            f"stage-out source {src}: {PurePosixPath(*src.parts[: depth + 1])} "
                            "is not a directory inside the job directory (symlinks are not "
                            "followed)"
                        )
                    key = key_for(dest_key, False, "", part)
                    yield self._verdict(parent, part, str(src), st, key)
                    return
                try:
                    parent = opened.enter_context(_Fd(self._open_dir(parent, part)))
                except UnsafeFileError as exc:
                    raise HpcstageError(f"stage-out source {src}: {exc}") from exc
            yield from self._walk_dir(parent, src.as_posix() if src.parts else "", "", dest_key)

    def _lstat_source(self, src: PurePosixPath, parent: int, part: str) -> os.stat_result:
        try:
            return os.stat(part, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError as exc:
            raise HpcstageError(
                f"stage-out source {src} does not exist in the job directory"
            ) from exc

    def _walk_dir(
        self, dir_fd: int, rel: str, in_src: str, dest_key: str, depth: int = 0
    ) -> Iterator[Output | Skipped | Refused]:
        with os.scandir(dir_fd) as found:
            listed = [(e.name, e.stat(follow_symlinks=False)) for e in found]
        # In whole-path order (``a.txt`` before ``a/x``), which a packed stage-out needs.
        entries = sorted(listed, key=lambda e: sort_key(e[0], stat.S_ISDIR(e[1].st_mode)))
        for name, st in entries:
            path, rel_in_src = _join(rel, name), _join(in_src, name)
            if not stat.S_ISDIR(st.st_mode):
                key = key_for(dest_key, True, rel_in_src, name)
                yield self._verdict(dir_fd, name, path, st, key)
                continue
            problem = _dir_problem(name, st, self.dev, depth)
            if problem:
                yield Refused(shown(path), f"{problem}; nothing in this directory is staged out")
                continue
            try:
                sub = self._open_dir(dir_fd, name)
            except UnsafeFileError as exc:
                yield Refused(shown(path), str(exc))
                continue
            with _Fd(sub):
                yield from self._walk_dir(sub, path, rel_in_src, dest_key, depth + 1)

    def _verdict(
        self, dir_fd: int, name: str, rel: str, st: os.stat_result, key: str
    ) -> Output | Skipped | Refused:
        if stat.S_ISLNK(st.st_mode):
            target = shown(os.readlink(name, dir_fd=dir_fd))
            return Skipped(shown(rel), f"symlink to '{target}' not followed")
        if not stat.S_ISREG(st.st_mode):
            return Skipped(shown(rel), "not a regular file (device, FIFO or socket)")
        problem = name_problem(name) or file_problem(st, self.dev, *self._uids)
        if problem:
            return Refused(shown(rel), problem)
        return Output(rel, key, st.st_size)

    @property
    def _uids(self) -> tuple[int, int]:
        return self.owners.job_uid, self.owners.service_uid

    def _open_dir(self, parent: int, name: str) -> int:
        try:
            fd = os.open(name, _DIR, dir_fd=parent)
        except OSError as exc:
            raise _unsafe(exc, "a directory on its path") from exc
        if os.fstat(fd).st_dev != self.dev:
            os.close(fd)
            raise UnsafeFileError("a directory on its path is on another file system")
        return fd

    # -- open ----------------------------------------------------------------------------

    def open(self, rel: str) -> tuple[int, os.stat_result]:
        """Open the listed output ``rel`` for reading: its fd (the caller closes it) and fstat.

        UnsafeFileError if a directory on the way is now a symlink or no directory, or the file
        is no longer one the walk would list (a symlink, special, someone else's, elsewhere).
        """
        *parents, name = PurePosixPath(rel).parts
        with ExitStack() as opened:
            parent = self.fd
            for part in parents:
                parent = opened.enter_context(_Fd(self._open_dir(parent, part)))
            try:
                fd = os.open(name, _FILE, dir_fd=parent)
            except OSError as exc:
                raise _unsafe(exc, "the file") from exc
        st = os.fstat(fd)
        problem = file_problem(st, self.dev, *self._uids)
        if problem:
            os.close(fd)
            raise UnsafeFileError(f"{problem} (it changed since it was listed)")
        return fd, st


def digests(fd: int) -> tuple[str, str]:
    """(MD5, SHA-256) of the whole file open as ``fd`` (read with pread: no shared offset)."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        md5.update(chunk)
        sha.update(chunk)
        offset += len(chunk)
    return md5.hexdigest(), sha.hexdigest()


def same_file(before: os.stat_result, after: os.stat_result) -> bool:
    """True if nothing wrote to the file between two fstats of one fd (size, mtime, ctime:
    a user can set mtime back, not ctime)."""
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    )


class _Fd:
    """Closes an fd at the end of a with block."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *_exc: object) -> None:
        os.close(self.fd)


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _dir_problem(name: str, st: os.stat_result, dev: int, depth: int) -> str:
    if problem := name_problem(name):
        return problem
    if st.st_dev != dev:
        return "on another file system (a mount point)"
    if depth + 1 >= MAX_DEPTH:
        return f"more than {MAX_DEPTH} directories deep"
    return ""


def _unsafe(exc: OSError, what: str) -> UnsafeFileError:
    """Why ``what`` (on the way to an output, or the output) could not be opened."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # O_DIRECTORY on a symlink: ENOTDIR
        return UnsafeFileError(f"{what} is now a symlink or of another kind (not followed)")
    if exc.errno == errno.ENXIO:
        return UnsafeFileError("not a regular file (a socket)")
    return UnsafeFileError(f"cannot open {what}: {exc.strerror}")

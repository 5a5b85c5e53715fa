"""Job views: a job's ``$HPCSTAGE_DIR``, built from hardlinks to cached objects, no bytes copied.

The job owns what is inside its view while it runs and may plant symlinks anywhere in it, so a
destination is never resolved by path: it is walked one component at a time from a directory fd,
each opened with O_NOFOLLOW. A symlinked parent, even one that points back inside the view, is
refused rather than resolved; so are absolute destinations and ``..``.

A hardlink doubles as the lease: while any view links an object its ``st_nlink`` is above 1 and
eviction leaves it alone; removing the view ends the lease without bookkeeping that could drift.
So the job must not be able to keep a link where the agent cannot remove it: links go only into
directories the service account made, each sticky (``VIEW_DIR_MODE``), so the job may add and
remove files of its own there but can neither move nor delete a link (nor a directory of links),
e.g. into a directory of its own that it then makes undeletable with ``chmod 500``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path, PurePosixPath
from typing import Any

from hpcstage.errors import CacheError

# Readable to the job (ACLs narrow it to the job's user), sticky: see the module docstring.
VIEW_DIR_MODE = 0o1755
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# C0, DEL and C1: a file name with a newline or an escape sequence breaks job scripts and
# carries terminal escapes into listings; directives refuse them too.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SHOWN_MAX = 200
NAME_MAX = 255  # bytes in one file name, on every Linux filesystem


def check_dest(dest: PurePosixPath | str) -> PurePosixPath:
    """Return ``dest`` as a path relative to a view, or raise CacheError if it could escape.

    Control characters are refused as well: no file in a view is named with them.
    """
    path = PurePosixPath(dest)
    if path.is_absolute() or not path.parts or ".." in path.parts:
        raise CacheError(
            f"refusing destination {_shown(str(dest))}: not a relative path inside the view"
        )
    bad = _CONTROL.search(str(path))
    if bad is not None:
        raise CacheError(
            f"refusing destination {_shown(str(dest))}: control character {bad.group()!r}"
        )
    return path


def key_dest(dest: PurePosixPath, rel: str, key: str) -> PurePosixPath:
    """Where the object ``key`` lands in a view: ``dest/rel``, ``rel`` being its part after the
    staged prefix (``""``: ``dest`` itself). Call it before fetching the object.

    Each key must get a path of its own, inside the view. Refused, with a CacheError naming the
    key: a leading '/', and empty, '.' or '..' components (PurePosixPath would fold 'p//x' and
    'p/./x' onto 'p/x', and one object would silently replace another), control characters,
    components over NAME_MAX bytes (S3 allows them; link(2) would refuse, after the fetch).
    """
    if not rel:
        return check_dest(dest)
    problem = ""
    odd = next((part for part in rel.split("/") if part in ("", ".", "..")), None)
    long = next((part for part in rel.split("/") if len(part.encode()) > NAME_MAX), None)
    if rel.startswith("/"):
        problem = "it starts with '/' after the prefix"
    elif odd is not None:
        problem = f"it has {'an empty' if not odd else repr(odd)} path component"
    elif long is not None:
        problem = f"its component {_shown(long[:40])}... is over {NAME_MAX} bytes"
    elif (bad := _CONTROL.search(rel)) is not None:
        problem = f"it holds the control character {bad.group()!r}"
    if problem:
        raise CacheError(f"object key {_shown(key)} cannot be a file in the job's view: {problem}")
    return check_dest(dest / rel)


def _shown(text: str) -> str:
    """``repr`` of ``text`` (control characters escaped), bounded for a one-line message."""
    shown = repr(text)
    return shown if len(shown) <= _SHOWN_MAX else shown[: _SHOWN_MAX - 4] + "...'"


def link_into(view: Path, dest: PurePosixPath, obj: Path) -> Path:
    """Hardlink ``obj`` at ``dest`` inside ``view``, creating parent directories as needed.

    An existing file at ``dest`` is replaced atomically. Raises CacheError if a parent is a
    symlink or not a directory, or if ``obj`` has vanished.
    """
    with ViewLinker() as linker:
        return linker.link(view, dest, obj)


class ViewLinker:
    """``link_into`` for many files: each parent directory is opened (and checked) once.

    The directory fds stay open until ``close``, so a batch of links into one directory of a
    view costs one ``link(2)`` each. Safe as the single call is: every link goes into the
    directory inode that was opened without following a symlink.
    """

    def __init__(self) -> None:
        self._dirs: dict[tuple[Path, tuple[str, ...]], int] = {}

    def link(self, view: Path, dest: PurePosixPath, obj: Path) -> Path:
        """Like ``link_into``; CacheError on failure."""
        parents = dest.parts[:-1]
        try:
            parent = self._dirs.get((view, parents))
            if parent is None:
                parent = open_parents(view, parents)
                self._dirs[(view, parents)] = parent
            _link_replace(obj, parent, dest.name)
        except (OSError, ValueError, CacheError) as exc:  # ValueError: a NUL byte in a name
            raise CacheError(f"cannot link {dest} into {view}: {exc}") from exc
        return view.joinpath(*dest.parts)

    def forget(self, view: Path) -> None:
        """Close what is open under ``view`` (after a failure there: it may be gone)."""
        for key in [k for k in self._dirs if k[0] == view]:
            os.close(self._dirs.pop(key))

    def close(self) -> None:
        dirs, self._dirs = self._dirs, {}
        for fd in dirs.values():
            os.close(fd)

    def __enter__(self) -> ViewLinker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def open_parents(view: Path, parts: Sequence[str]) -> int:
    """Open (creating) the directory ``view/parts...`` without following any symlink."""
    fd = os.open(view, _OPEN_DIR)
    try:
        for part in parts:
            child = _open_subdir(fd, part)
            fd, old = child, fd
            os.close(old)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_subdir(dir_fd: int, name: str) -> int:
    """Open directory ``name`` under ``dir_fd``, creating it (``VIEW_DIR_MODE``) if missing.

    CacheError if it is the job's: a link there could be moved out of the agent's reach.
    """
    with suppress(FileExistsError):  # ours from an earlier link, or the job's: checked below
        os.mkdir(name, VIEW_DIR_MODE, dir_fd=dir_fd)
    fd = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
    try:
        found = os.fstat(fd)
        if found.st_uid != os.geteuid():
            raise CacheError(f"directory {name!r} was not made by hpcstage but by the job")
        if stat.S_IMODE(found.st_mode) != VIEW_DIR_MODE:
            # New (mkdir's mode is filtered by the umask and drops the sticky bit on some
            # systems), or made by an hpcstage that did not make view directories sticky.
            os.fchmod(fd, VIEW_DIR_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _link_replace(obj: Path, dir_fd: int, name: str) -> None:
    """Link ``obj`` as ``name`` in ``dir_fd``; an existing ``name`` is replaced via a temp
    name, so readers never see a gap."""
    try:
        os.link(obj, name, dst_dir_fd=dir_fd, follow_symlinks=False)
        return  # the usual case: nothing there yet
    except FileExistsError:
        pass
    temp = f".hpcstage-link-{secrets.token_hex(8)}"
    os.link(obj, temp, dst_dir_fd=dir_fd, follow_symlinks=False)
    try:
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        # rename() is a no-op when both names already link the same inode: drop the temp then.
        with suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)


PROTECTED_HARDLINKS = Path("/proc/sys/fs/protected_hardlinks")


def hardlinks_protected(setting: Path = PROTECTED_HARDLINKS) -> bool:
    """False if the kernel lets users hardlink files they cannot write (``fs.protected_hardlinks``
    is 0): a job could then link its inputs into a directory of its own, outside the agent's
    reach, and keep the cached objects leased forever. True where the setting is unknown."""
    try:
        return setting.read_text().strip() != "0"
    except OSError:
        return True


def remove_tree(view: Path) -> None:
    """Remove ``view`` and everything in it, never following a symlink.

    Raises CacheError naming what could not be removed (e.g. files the job made undeletable).
    """
    if not os.path.lexists(view):
        return
    failures: list[str] = []

    def record(_func: Callable[..., Any], path: str, exc: BaseException) -> None:
        failures.append(f"{path}: {exc}")

    # shutil.rmtree walks with directory fds on Linux and unlinks symlinks instead of following.
    if sys.version_info >= (3, 12):
        shutil.rmtree(view, onexc=record)
    else:
        shutil.rmtree(view, onerror=lambda func, path, info: record(func, path, info[1]))
    if failures:
        raise CacheError(f"could not remove {len(failures)} entries of {view}: {failures[0]}")

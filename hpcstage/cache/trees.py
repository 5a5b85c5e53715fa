"""Packed trees: a packed dataset's selection materialised once per node, shared by every job
that stages it (docs/packed-datasets.md, "Staging a packed dataset").

    CACHE/packed/                         0711: traversable, not listable
    CACHE/packed/<tree_id>/               0700, the service account's; one ACL entry
                                          u:<user>:r-x per user with a job using it
    CACHE/packed/<tree_id>/root/...       the selected files (0444) and directories (0555)
    CACHE/packed/<tree_id>.tmp-<random>/  a tree being built (removed at agent start)

A tree is built in its temp directory, made read-only and renamed into place; its index row is
written after the rename, so a row always names a complete tree. Attaching a job is O(1) in the
tree's size: an ACL entry on the tree's directory (by the agent), one symlink in the job's view
and one lease row. The index holds one row per tree and one per lease, never one per file.

Durability: no fsync per file. A tree is readable as soon as its files are written and
verified; one ``syncfs`` afterwards marks it durable. At agent start a tree not marked durable
is kept if it was built in this boot (the page cache still holds its bytes: a sync now makes
it durable) and discarded otherwise (a power cut may have lost part of it). A temp tree keeps a
journal (boot id, then the batches written); one left by an agent killed in this boot is
resumed by the next build of the same tree, one from another boot is removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hpcstage.cache.index import Index, TreeRow
from hpcstage.cache.layout import NO_GUARD, TEMP_MARK, Guard, boot_id, make_dir
from hpcstage.cache.views import open_parents
from hpcstage.errors import CacheError

log = logging.getLogger(__name__)

PACKED = "packed"
ROOT = "root"
PACKED_MODE = 0o711
TREE_MODE = 0o700
FILE_MODE = 0o444
DIR_MODE = 0o555
_BUILD_DIR_MODE = 0o700  # while the build writes into it
WRITER_DIR_FDS = 64  # directory fds one writer keeps open at most
JOURNAL = "journal"  # in a temp tree: its boot id, then one line per batch written
RESUME_MAX_AGE = 3600.0  # seconds a killed build's temp tree waits to be resumed
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def tree_id(dataset_url: str, version: int, subtree: str) -> str:
    """The name of a selection's tree: a digest of the dataset's URL (store, bucket, prefix),
    the version and the subtree, so nothing a user writes becomes a path."""
    text = f"{dataset_url}\0{version}\0{subtree}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class TreeBuild:
    """A new tree's temp directory, filled by ``writer()``s (one per batch of files, any
    number of threads at once), then sealed read-only by ``seal()``.

    Directories are made on demand and remembered by path (one string each), but their fds
    are held only by a writer, for its batch: a tree of 10^5 directories never holds 10^5
    fds. Nothing else can reach the temp directory (0700, no ACL) while it is built.
    """

    def __init__(self, temp: Path, done: set[str] | None = None) -> None:
        """A new build in the empty directory ``temp``, or (``done``: the batches its journal
        lists) one resumed in the same boot after its agent was killed."""
        self.temp = temp
        self.root = temp / ROOT
        self.files = 0
        self.bytes = 0
        self.resumed = done is not None
        self.done = done or set()
        self._made: list[str] = []
        self._lock = threading.Lock()
        if done is None:
            self.root.mkdir(mode=_BUILD_DIR_MODE)
            (temp / JOURNAL).write_text(boot_id() + "\n")
        else:
            self._made = [
                str(Path(top, d).relative_to(self.root))
                for top, dirs, _ in os.walk(self.root)
                for d in dirs
            ]
        self._journal = os.open(temp / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def finished(self, batch: str) -> None:
        """Record that every file of ``batch`` (a name the caller chooses) is written: a build
        resumed in this boot skips it. No fsync: after a reboot the journal is not trusted."""
        os.write(self._journal, (batch + "\n").encode())

    def writer(self) -> TreeWriter:
        """A writer for one batch of files (close it, or use it as a context manager)."""
        return TreeWriter(self)

    def count(self, files: int, size: int) -> None:
        """Add a finished batch to the tree's counts."""
        with self._lock:
            self.files += files
            self.bytes += size

    def made(self, rel: str) -> None:
        with self._lock:
            self._made.append(rel)

    @property
    def dirs(self) -> int:
        return len(self._made)

    def seal(self) -> None:
        """Make every directory read-only, deepest first (so each parent is still writable
        when its child is changed; chmod by path below the root's fd: no symlink exists in a
        tree the agent alone has written)."""
        root = os.open(self.root, _OPEN_DIR)
        try:
            for rel in sorted(self._made, key=lambda r: -r.count("/")):
                os.chmod(rel, DIR_MODE, dir_fd=root)
            os.fchmod(root, DIR_MODE)
        finally:
            os.close(root)
        self.close()
        (self.temp / JOURNAL).unlink()

    def close(self) -> None:
        """Close the journal (writers close their own fds)."""
        if self._journal >= 0:
            os.close(self._journal)
            self._journal = -1


class TreeWriter:
    """Writes files into a ``TreeBuild`` with a lean per-file path: open relative to the
    parent's directory fd, write, set the mtime on the fd, close; no fsync."""

    def __init__(self, build: TreeBuild) -> None:
        self.build = build
        self._dirs: dict[str, int] = {"": os.open(build.root, _OPEN_DIR)}

    def write(self, path: str, data: bytes | memoryview, mtime_ns: int) -> None:
        """Create the file ``path`` (relative, checked by the caller) holding ``data``."""
        parent, _, name = path.rpartition("/")
        dir_fd = self._dirs.get(parent)
        if dir_fd is None:
            if len(self._dirs) > WRITER_DIR_FDS:
                self._forget()  # paths come sorted: the directories behind are done with
            dir_fd = self._dir(parent)
        if self.build.resumed:  # a batch cut short by the kill may have written it (0444)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
        try:
            fd = os.open(name, _OPEN_NEW, FILE_MODE, dir_fd=dir_fd)
        except FileExistsError:
            raise CacheError(f"{path!r} appears twice in the selection") from None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if mtime_ns:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)

    def _dir(self, rel: str) -> int:
        """The fd of directory ``rel`` below the root, made (and its parents) if missing."""
        found = self._dirs.get(rel)
        if found is not None:
            return found
        parent, _, name = rel.rpartition("/")
        parent_fd = self._dir(parent)
        try:
            os.mkdir(name, _BUILD_DIR_MODE, dir_fd=parent_fd)
            self.build.made(rel)
        except FileExistsError:
            pass  # made by an earlier batch, or by another writer just now
        try:
            fd = os.open(name, _OPEN_DIR, dir_fd=parent_fd)
        except OSError as exc:  # a file where the selection wants a directory
            raise CacheError(f"{rel!r} is both a file and a directory") from exc
        self._dirs[rel] = fd
        return fd

    def _forget(self) -> None:
        root = self._dirs.pop("")
        self.close()
        self._dirs[""] = root

    def close(self) -> None:
        dirs, self._dirs = self._dirs, {}
        for fd in dirs.values():
            os.close(fd)

    def __enter__(self) -> TreeWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass(frozen=True)
class Revoke:
    """A user whose last job using a tree was released: the ACL entry to remove."""

    path: Path
    user: str


class PackedTrees:
    """The trees of one node cache: build, look up, attach, release, evict, reconcile."""

    def __init__(
        self, cache_root: Path, index: Index, clock: Callable[[], float], guard: Guard = NO_GUARD
    ) -> None:
        self.dir = cache_root / PACKED
        self._guard = guard  # held from the last check to the row (layout.Guard)
        make_dir(self.dir, PACKED_MODE)
        self.dir.chmod(PACKED_MODE)
        self._index = index
        self._clock = clock
        self._lock = threading.Lock()  # a lease check in eviction vs. an attach
        self.syncs = 0  # background syncfs calls that finished (tests wait on it)

    def path(self, tid: str) -> Path:
        return self.dir / _checked(tid)

    def root(self, tid: str) -> Path:
        return self.path(tid) / ROOT

    def lookup(self, tid: str) -> TreeRow | None:
        """The complete tree ``tid``, or None (a row whose directory vanished is dropped)."""
        row = self._index.tree(tid)
        if row is None:
            return None
        if not self.root(tid).is_dir():
            self._index.delete_tree(tid)
            return None
        return row

    def begin(self, tid: str) -> TreeBuild:
        """A private temp directory to build tree ``tid`` in: the one a killed agent left in
        this boot, resumed, or a new one."""
        mark = f"{_checked(tid)}{TEMP_MARK}"
        for name in sorted(n for n in os.listdir(self.dir) if n.startswith(mark)):
            done = _resumable(self.dir / name)
            if done is not None:
                return TreeBuild(self.dir / name, done)
            _remove(self.dir / name)
        temp = self.dir / f"{mark}{secrets.token_hex(4)}"
        temp.mkdir(mode=TREE_MODE)
        return TreeBuild(temp)

    def abort(self, build: TreeBuild) -> None:
        build.close()
        _remove(build.temp)

    def commit(
        self, tid: str, build: TreeBuild, dataset: str, version: int, subtree: str
    ) -> TreeRow:
        """Seal ``build``, rename it into place and index it; durable later (``sync``)."""
        build.seal()
        os.chmod(build.temp, TREE_MODE)
        final = self.path(tid)
        with self._guard():  # FencedError: the build stays, for the next agent to resume
            if final.exists():  # an older build left by a crash, or a concurrent one: replace
                _remove(final)
            os.rename(build.temp, final)
            now = self._clock()
            counts = (build.files, build.dirs, build.bytes)
            row = TreeRow(tid, dataset, version, subtree, *counts, 0, boot_id(), now, now)
            self._index.put_tree(row)
        return row

    def sync(self, tid: str) -> None:
        """Flush the cache's file system and mark ``tid`` durable (run in the background)."""
        syncfs(self.dir)
        self._index.tree_durable(tid)
        self.syncs += 1

    def attach(self, tid: str, job_view: Path, dest: PurePosixPath, job: str, user: str) -> Path:
        """Show tree ``tid`` at ``dest`` in the job's view: one symlink and one lease row.

        The caller grants ``user`` read access to ``path(tid)`` first (an ACL entry)."""
        target = self.root(tid)
        parent = open_parents(job_view, dest.parts[:-1])
        try:
            try:
                os.symlink(target, dest.name, dir_fd=parent)
            except FileExistsError:
                temp = f".hpcstage-link-{secrets.token_hex(8)}"
                os.symlink(target, temp, dir_fd=parent)
                os.rename(temp, dest.name, src_dir_fd=parent, dst_dir_fd=parent)
        except OSError as exc:
            raise CacheError(f"cannot attach {dest} in {job_view}: {exc}") from exc
        finally:
            os.close(parent)
        with self._lock:
            if self._index.tree(tid) is None:
                raise CacheError(f"packed tree {tid} was evicted while being attached")
            self._index.lease_tree(tid, job, user)
            self._index.touch_tree(tid, self._clock())
        return job_view.joinpath(*dest.parts)

    def release(self, job: str) -> list[Revoke]:
        """End ``job``'s leases; the ACL entries no other job of the same user still needs."""
        with self._lock:
            ended = self._index.drop_job_leases(job)
            left = {(t, u) for t, _j, u in self._index.tree_leases()}
        now = self._clock()
        revoke = []
        for tid, _job, user in ended:
            self._index.touch_tree(tid, now)
            if (tid, user) not in left:
                revoke.append(Revoke(self.path(tid), user))
        return revoke

    def leased(self) -> set[str]:
        return {t for t, _j, _u in self._index.tree_leases()}

    def rows(self) -> list[TreeRow]:
        """Every tree, least recently used first."""
        return self._index.trees()

    def evict(self, tid: str) -> bool:
        """Remove tree ``tid`` unless a job holds a lease on it (False then)."""
        with self._lock:
            if self._index.tree_leases(tid):
                return False
            self._index.delete_tree(tid)
        _remove(self.path(tid))
        return True

    def reconcile(self) -> int:
        """At agent start: remove temp trees, trees without a row, rows without a tree, and
        trees not durable from an earlier boot; sync those of this boot. Trees removed."""
        removed = 0
        rows = {row.tree_id: row for row in self._index.trees()}
        with os.scandir(self.dir) as found:
            names = [e.name for e in found]
        for name in names:
            if TEMP_MARK in name and _resumable(self.dir / name) is not None:
                continue  # killed mid-build in this boot: the next stage resumes it
            if TEMP_MARK in name or name not in rows:
                _remove(self.dir / name)
                removed += 1
        me = boot_id()
        for tid, row in rows.items():
            if tid not in names:
                self._index.delete_tree(tid)
            elif not row.durable and (not me or row.boot_id != me):
                log.warning("discarding packed tree %s: not on disk before a reboot", tid)
                self._index.delete_tree(tid)
                _remove(self.path(tid))
                removed += 1
            elif not row.durable:
                self.sync(tid)
        return removed


def _resumable(temp: Path) -> set[str] | None:
    """The batches a temp tree's journal lists, if it was written in this boot and recently;
    None if it cannot be resumed (another boot: a power cut may have lost files it lists)."""
    try:
        text = (temp / JOURNAL).read_text()
        age = time.time() - (temp / JOURNAL).stat().st_mtime
    except (OSError, UnicodeDecodeError):
        return None
    lines = text.splitlines()
    me = boot_id()
    if not lines or not me or lines[0] != me or age > RESUME_MAX_AGE:
        return None
    return set(lines[1:])


def _checked(tid: str) -> str:
    if len(tid) != 32 or any(c not in "0123456789abcdef" for c in tid):
        raise CacheError(f"not a packed tree id: {tid!r}")
    return tid


def _remove(path: Path) -> None:
    """Remove a tree (its directories are read-only: made writable first), never following a
    symlink."""
    if not os.path.lexists(path):
        return
    for top, dirs, _files in os.walk(path, followlinks=False):
        for name in dirs:
            full = os.path.join(top, name)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    if not os.path.islink(path):
        os.chmod(path, 0o700)
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        raise CacheError(f"cannot remove packed tree {path}")


_libc: ctypes.CDLL | None = None


def syncfs(path: Path) -> None:
    """syncfs(2) of the file system holding ``path`` (os.sync where libc lacks it)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = os.open(path, _OPEN_DIR)
    try:
        if getattr(_libc, "syncfs", None) is None or _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)

"""The node cache: immutable objects keyed by source identity, job views, leases and eviction.

One directory per node, owned by the agent's service account (layout in ``cache/layout.py``).
Objects are written crash-safely: a download goes to ``<cache_id>.tmp-<random>`` in the same
directory, is fsynced, made read-only and renamed into place, the directory is fsynced, and only
then is the index row written. Small objects (up to ``GROUP_COMMIT_MAX``) are committed in
groups: each is written straight to its final place from memory (``ensure_small``) or renamed
there from its temp file, then one syncfs(2) of the cache's filesystem and one index
transaction cover the whole group, which is what makes millions of 4 KiB files affordable.
Either way a crash leaves a temp file or a file without a row, both removed by ``reconcile()``
at agent start and never returned by a lookup; no row ever names partial bytes.

Leases are hardlinks: an object is leased while any job view links it (``st_nlink > 1``), and
eviction never removes a leased object. ``link()`` and ``evict()`` take the object's lock (one
of 64 stripes), so a lease checked by eviction cannot be created behind its back.

One agent process owns a cache directory; the methods are synchronous and quick (the agent may
call them from worker threads), except ``ensure()``, the asyncio entry point for fetching.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import logging
import os
import re
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Generic, TypeVar

from hpcstage.cache.evict import Entry, EvictionPass
from hpcstage.cache.index import Index, Row
from hpcstage.cache.layout import (
    INDEX,
    JOBS,
    OBJECT_MODE,
    OBJECTS,
    RELEASED,
    TEMP_MARK,
    check_job_id,
    fsync_dir,
    is_temp_name,
    make_dir,
    object_path,
)
from hpcstage.cache.views import ViewLinker, check_dest, remove_tree
from hpcstage.core.identity import ObjectRef
from hpcstage.errors import CacheError
from hpcstage.store.libc import libc_function

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_FANOUT = re.compile(r"[0-9a-f]{2}")
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FINAL = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Partial bytes are private until committed; the committed object becomes OBJECT_MODE (0444).
_TEMP_MODE = 0o600
GROUP_COMMIT_MAX = 1 << 20  # objects up to this size are committed in groups (one flush)
GROUP_MAX = 512  # objects per group at most
_STRIPES = 64
BATCH_PARALLEL = 2  # group commits (and, separately, link groups) running at once
_In = TypeVar("_In")
_Out = TypeVar("_Out")


@dataclass
class PendingObject:
    """An in-flight download: write the bytes to ``fd``, then ``commit`` or ``abort`` it."""

    ref: ObjectRef
    fd: int
    path: Path  # the temp file
    final: Path  # where commit() renames it
    closed: bool = False

    def close(self) -> None:
        """Close ``fd`` once; later calls do nothing."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)


@dataclass
class CacheStats:
    """Counters since this NodeCache was opened (tests count GETs with ``fetched_objects``)."""

    fetched_objects: int = 0  # fetches that ran and were committed
    fetched_bytes: int = 0
    failed_fetches: int = 0
    hits: int = 0  # lookups that found the object complete
    joined: int = 0  # ensure() calls that waited for another caller's fetch
    peer_objects: int = 0  # objects copied from another node's cache instead of the store
    peer_bytes: int = 0
    peer_refused: int = 0  # peer copies that failed verification (fetched from the store later)


@dataclass(frozen=True)
class ReconcileReport:
    """What ``reconcile()`` cleaned up, and what it kept."""

    temps_removed: int
    rows_dropped: int
    orphans_removed: int
    objects: int
    bytes: int
    leftovers: int = 0  # released views still holding what their job made undeletable


@dataclass(frozen=True)
class Usage:
    """Bytes and objects in the cache, and how much of it job views hold leased."""

    bytes: int
    objects: int
    leased_bytes: int
    leased_objects: int


Fetch = Callable[[PendingObject], Awaitable[str]]
ReadSmall = Callable[[], Awaitable[tuple[bytes, str]]]


@dataclass(frozen=True)
class SmallObject:
    """A small object's verified bytes in memory and their sha256, ready to be committed."""

    ref: ObjectRef
    body: bytes
    sha256_hex: str


GroupItem = SmallObject | tuple[PendingObject, str]


def item_ref(item: GroupItem) -> ObjectRef:
    """The object a group-commit item is about."""
    return item.ref if isinstance(item, SmallObject) else item[0].ref


ROOT_MODE = 0o711
# Sticky like every directory the agent makes in a view (see cache/views.py).
VIEW_MODE = 0o1700


class NodeCache:
    """A node-local cache directory: objects, their index, and per-job views."""

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time) -> None:
        """Open (creating if needed) the cache at ``root``; ``clock`` gives Unix times."""
        self.root = Path(root)
        self.objects = self.root / OBJECTS
        self.jobs = self.root / JOBS
        self.released = self.root / RELEASED
        self.root.parent.mkdir(parents=True, exist_ok=True)
        # Isolation without root: other users may traverse to a view they were granted (by an
        # ACL on the view itself) but list nothing, and never reach objects by their own path.
        modes = {self.root: ROOT_MODE, self.objects: 0o700, self.jobs: ROOT_MODE}
        for path, mode in {**modes, self.released: 0o700}.items():
            make_dir(path)
            path.chmod(mode)
        self.stats = CacheStats()
        self._clock = clock
        self._index = Index(self.root / INDEX)  # private (0600), its WAL and shm files too
        self._lock = threading.RLock()
        # A lease check in eviction and a link of the same object exclude each other; objects
        # are spread over stripes so links of different objects do not wait for each other.
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._inflight: dict[str, asyncio.Task[Path]] = {}
        self._views_made: set[str] = set()
        # Group commits and links run in the cache's own threads, not asyncio's default pool
        # (which reads from shared filesystems and does the agent's other blocking calls).
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=2 * BATCH_PARALLEL, thread_name_prefix="node-cache"
        )
        self._group: _Batcher[GroupItem, Path] = _Batcher(
            self.commit_group, self._threads, BATCH_PARALLEL
        )
        self._linker: _Batcher[tuple[str, PurePosixPath | str, Path], Path] = _Batcher(
            self.link_many, self._threads, BATCH_PARALLEL
        )

    def close(self) -> None:
        """Close the index; the cache is unusable afterwards."""
        self._threads.shutdown(wait=True, cancel_futures=True)
        self._index.close()

    def __enter__(self) -> NodeCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- objects ---------------------------------------------------------------------------

    def lookup(self, ref: ObjectRef) -> Path | None:
        """The path of ``ref``'s complete object, or None; a hit counts as an access for LRU."""
        row = self._index.get(ref.cache_id)
        if row is None:
            return None
        path = object_path(self.objects, row.cache_id)
        if _file_size(path) != row.size:
            # Removed or truncated behind our back: forget it so the next ensure() refetches.
            self._index.delete(row.cache_id)
            return None
        self._index.touch(row.cache_id, self._clock())
        with self._lock:
            self.stats.hits += 1
        return path

    def begin(self, ref: ObjectRef) -> PendingObject:
        """Create a private temp file next to ``ref``'s final place, for a download to fill."""
        final = object_path(self.objects, ref.cache_id)
        temp = final.with_name(f"{final.name}{TEMP_MARK}{secrets.token_hex(8)}")
        try:
            try:
                fd = os.open(temp, _CREATE, _TEMP_MODE)
            except FileNotFoundError:  # the first object of its fan-out directory
                make_dir(final.parent)
                fd = os.open(temp, _CREATE, _TEMP_MODE)
        except OSError as exc:
            raise CacheError(f"cannot start object {ref.cache_id}: {exc}") from exc
        return PendingObject(ref, fd, temp, final)

    def commit(self, pending: PendingObject, sha256_hex: str) -> Path:
        """Make ``pending`` a complete, read-only, indexed object and return its path.

        Raises CacheError (after aborting) if the size differs from ``ref.size``, the checksum
        is not 64 hex digits, or the disk fails.
        """
        try:
            self._seal(pending, sha256_hex)
            os.rename(pending.path, pending.final)
            fsync_dir(pending.final.parent)
        except BaseException as exc:
            self.abort(pending)
            if isinstance(exc, OSError):
                raise CacheError(f"cannot commit object {pending.ref.cache_id}: {exc}") from exc
            raise
        self._index.put(self._new_row(pending.ref, sha256_hex))
        return pending.final

    def commit_group(self, items: list[GroupItem]) -> list[Path | BaseException]:
        """``commit()`` for many small objects with one flush and one index transaction.

        Each item is either a finished download (checked, made read-only and renamed into
        place) or a ``SmallObject`` in memory (written straight to its final place, read-only).
        Then the cache's filesystem is synced once (syncfs(2); where that is missing, every
        file and directory is fsynced) and only then are the rows written, in one transaction.
        A crash before the rows leaves complete or partial files without a row, which
        ``reconcile()`` deletes and no lookup ever returns. Returns, per item, its object path
        or the exception that aborted it.
        """
        results: list[Path | BaseException] = []
        placed: list[tuple[int, ObjectRef, str, Path]] = []  # (index in results, ref, ...)
        group_sync = _syncfs_available()
        for item in items:
            try:
                if isinstance(item, SmallObject):
                    final = self._write_final(item, flush=not group_sync)
                    ref, digest = item.ref, item.sha256_hex
                else:
                    pending, digest = item
                    ref, final = pending.ref, pending.final
                    self._seal_and_place(pending, digest, flush=not group_sync)
            except BaseException as exc:
                if isinstance(exc, OSError):
                    exc = CacheError(f"cannot commit object {item_ref(item).cache_id}: {exc}")
                results.append(exc)
                continue
            placed.append((len(results), ref, digest, final))
            results.append(final)
        if not placed:
            return results
        try:
            if group_sync:
                _syncfs(self.objects)
            else:
                for parent in {final.parent for *_, final in placed}:
                    fsync_dir(parent)
            self._index.put_many([self._new_row(ref, digest) for _, ref, digest, _ in placed])
        except (OSError, sqlite3.Error) as exc:
            failed = CacheError(f"cannot commit {len(placed)} objects: {exc}")
            for index, _, _, final in placed:
                final.unlink(missing_ok=True)
                results[index] = failed
        return results

    def _seal_and_place(self, pending: PendingObject, digest: str, flush: bool) -> None:
        try:
            self._seal(pending, digest, flush=flush)
            os.rename(pending.path, pending.final)
        except BaseException:
            self.abort(pending)
            raise

    def _write_final(self, obj: SmallObject, flush: bool) -> Path:
        """Write ``obj`` to its final place, read-only; it counts only once indexed."""
        ref = obj.ref
        _check_complete(ref, len(obj.body), obj.sha256_hex)
        final = object_path(self.objects, ref.cache_id)
        fd = -1
        for _ in range(3):
            try:
                fd = os.open(final, _CREATE_FINAL, OBJECT_MODE)
                break
            except FileNotFoundError:  # the first object of its fan-out directory
                make_dir(final.parent)
            except FileExistsError:
                # No row names it (lookup missed and fetches are single-flight): a leftover of
                # a crash or of an object removed from the index. Never served: replace it.
                final.unlink()
        if fd < 0:
            raise CacheError(f"cannot create object {ref.cache_id}")
        try:
            view = memoryview(obj.body)
            while view:
                view = view[os.write(fd, view) :]
            if flush:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            final.unlink(missing_ok=True)
            raise
        os.close(fd)
        return final

    def abort(self, pending: PendingObject) -> None:
        """Drop an in-flight download: close and delete its temp file (idempotent)."""
        try:
            pending.close()
        finally:
            pending.path.unlink(missing_ok=True)

    def _seal(self, pending: PendingObject, sha256_hex: str, flush: bool = True) -> None:
        """Check a finished download, flush it to disk (unless ``flush`` is False: the caller
        syncs the whole group) and make it read-only."""
        if pending.closed:
            raise CacheError(f"object {pending.ref.cache_id} was already committed or aborted")
        _check_complete(pending.ref, os.fstat(pending.fd).st_size, sha256_hex)
        if flush:
            os.fsync(pending.fd)
        os.fchmod(pending.fd, OBJECT_MODE)
        pending.close()

    def _new_row(self, ref: ObjectRef, sha256_hex: str) -> Row:
        now = self._clock()
        return Row(
            ref.cache_id, ref.store, ref.bucket, ref.key, ref.etag, ref.size, sha256_hex, now, now
        )

    # -- singleflight ----------------------------------------------------------------------

    async def ensure(self, ref: ObjectRef, fetch: Fetch) -> Path:
        """Return ``ref``'s object path, running ``fetch`` at most once per object at a time.

        ``fetch`` writes the bytes to ``pending.fd`` and returns their sha256 hex digest.
        Concurrent calls for the same object share one fetch and its result or exception; on
        failure the temp file is removed. One caller being cancelled does not cancel the fetch.
        """
        return await self._singleflight(ref, lambda: self._fetch(ref, fetch))

    async def ensure_small(self, ref: ObjectRef, read: ReadSmall, peer: bool = False) -> Path:
        """``ensure()`` for a small object whose bytes ``read`` returns in memory, verified,
        with their sha256 hex digest. The object is written straight to its final place by the
        group commit (no temp file; an unindexed file left by a crash is what reconcile
        removes), so the event loop never creates a file. ``peer``: the bytes come from
        another node's cache (counted apart from fetches from the store)."""
        return await self._singleflight(ref, lambda: self._fetch_small(ref, read, peer))

    async def _singleflight(
        self, ref: ObjectRef, start: Callable[[], Coroutine[Any, Any, Path]]
    ) -> Path:
        found = self.lookup(ref)
        if found is not None:
            return found
        cache_id = ref.cache_id
        task = self._inflight.get(cache_id)
        if task is None:
            task = asyncio.create_task(start(), name=f"fetch-{cache_id[:16]}")
            self._inflight[cache_id] = task
            task.add_done_callback(functools.partial(self._fetch_done, cache_id))
        else:
            self.stats.joined += 1
        return await asyncio.shield(task)

    async def _fetch(self, ref: ObjectRef, fetch: Fetch) -> Path:
        pending = self.begin(ref)
        try:
            digest = await fetch(pending)
        except BaseException:
            self.abort(pending)
            self.stats.failed_fetches += 1
            raise
        if ref.size <= GROUP_COMMIT_MAX:
            # Many small objects: one flush and one index transaction for a whole group.
            path = await self._group.submit((pending, digest))
        else:
            # fsync of a multi-GB object can take seconds: keep it off the event loop. commit()
            # aborts by itself on failure, so a cancelled await here leaves nothing half-done.
            path = await asyncio.to_thread(self.commit, pending, digest)
        self.stats.fetched_objects += 1
        self.stats.fetched_bytes += ref.size
        return path

    async def _fetch_small(self, ref: ObjectRef, read: ReadSmall, peer: bool) -> Path:
        try:
            body, digest = await read()
        except BaseException:
            self.stats.failed_fetches += 1
            raise
        path = await self._group.submit(SmallObject(ref, body, digest))
        if peer:
            self.stats.peer_objects += 1
            self.stats.peer_bytes += ref.size
        else:
            self.stats.fetched_objects += 1
            self.stats.fetched_bytes += ref.size
        return path

    # -- peers -----------------------------------------------------------------------------

    def holdings(
        self, store: str, bucket: str, prefix: str, after: str, limit: int
    ) -> tuple[list[Row], str]:
        """What this cache holds under ``prefix`` of a bucket, for a peer: the newest cached
        version of each key, a page of at most ``limit`` rows, and the cursor of the next page
        ("" when this was the last). An older version of a key may be what the store holds
        now; the peer lists the store itself and fetches what differs."""
        rows = self._index.under(store, bucket, prefix, after, limit)
        newest: list[Row] = []
        for row in rows:
            if not newest or newest[-1].key != row.key:
                newest.append(row)
        return newest, (rows[-1].key if len(rows) == limit else "")

    def held(self, cache_ids: list[str]) -> set[str]:
        """Those of ``cache_ids`` this cache has indexed."""
        return self._index.have(cache_ids)

    def read_object(self, cache_id: str, max_size: int) -> tuple[Row, bytes] | None:
        """An indexed object's row and bytes, for a peer (None: not held, too big, or not
        the indexed size any more). The peer checks the bytes against the row's SHA-256."""
        row = self._index.get(cache_id)
        if row is None or row.size > max_size:
            return None
        try:
            with open(object_path(self.objects, cache_id), "rb") as file:
                body = file.read(row.size + 1)
        except OSError:
            return None
        return (row, body) if len(body) == row.size else None

    def _fetch_done(self, cache_id: str, task: asyncio.Task[Path]) -> None:
        if self._inflight.get(cache_id) is task:
            del self._inflight[cache_id]
        if not task.cancelled():
            # Mark the exception retrieved: if every waiter gave up, asyncio would log it.
            task.exception()

    # -- views -----------------------------------------------------------------------------

    def view_dir(self, job_id: str) -> Path:
        """The job's view (its ``$HPCSTAGE_DIR``), created empty if missing."""
        path = self.jobs / check_job_id(job_id)
        if job_id not in self._views_made:
            make_dir(path, VIEW_MODE)  # the agent grants the job's user by ACL (see the agent)
            self._views_made.add(job_id)
        return path

    def link(self, job_id: str, dest: PurePosixPath | str, obj: Path) -> Path:
        """Hardlink the cached object ``obj`` at ``dest`` in the job's view; return that path.

        This is the job's lease on ``obj``. Parents are created; an existing file at ``dest`` is
        replaced atomically. Raises CacheError if ``dest`` is absolute, contains ``..`` or has a
        symlinked parent, if ``obj`` is not one of this cache's objects, or if it was evicted
        since it was looked up (ensure it again).
        """
        with ViewLinker() as linker:
            return self._link(linker, job_id, dest, obj)

    def _link(self, linker: ViewLinker, job_id: str, dest: PurePosixPath | str, obj: Path) -> Path:
        rel = check_dest(dest)
        if Path(obj) != object_path(self.objects, Path(obj).name):
            raise CacheError(f"not an object of this cache: {obj}")
        view = self.view_dir(job_id)
        with self._stripe(Path(obj).name):  # eviction reads this object's lease under it
            try:
                return linker.link(view, rel, Path(obj))
            except CacheError:
                self._views_made.discard(job_id)  # the view may be gone: check it next time
                linker.forget(view)
                raise

    def link_many(
        self, items: list[tuple[str, PurePosixPath | str, Path]]
    ) -> list[Path | BaseException]:
        """``link()`` for several (job_id, dest, obj); per item its path or its exception.

        Each directory of a view is opened once per call, not once per file."""
        results: list[Path | BaseException] = []
        with ViewLinker() as linker:
            for job_id, dest, obj in items:
                try:
                    results.append(self._link(linker, job_id, dest, obj))
                except Exception as exc:
                    results.append(exc)
        return results

    async def link_async(self, job_id: str, dest: PurePosixPath | str, obj: Path) -> Path:
        """``link()`` from the event loop, batched with other links into one worker thread."""
        return await self._linker.submit((job_id, dest, obj))

    def _stripe(self, cache_id: str) -> threading.Lock:
        return self._stripes[int(cache_id[:2], 16) % _STRIPES]

    def release(self, job_id: str) -> str:
        """Remove the job's view and everything the job left in it, ending its leases.

        Always succeeds whatever the job did inside: the view is first renamed aside into
        ``released/`` (the service account owns it, so it may always rename it), which frees
        the job id at once; then everything the service account may delete is deleted, never
        following a symlink. What the job made undeletable to it (a directory of its own with
        mode 500) stays there, logged, to be retried once when an agent next opens the cache;
        it holds none of the leases (see cache/views.py). Returns the name of such a leftover
        under ``released/``, or "". The objects themselves always stay.
        """
        self._views_made.discard(job_id)
        aside = self.released / f"{check_job_id(job_id)}.{secrets.token_hex(4)}"
        try:
            os.rename(self.jobs / job_id, aside)
        except FileNotFoundError:
            return ""  # released before
        except OSError as exc:
            raise CacheError(f"cannot release the view of job {job_id}: {exc}") from exc
        return "" if self._clear_leftover(aside) else aside.name

    def _clear_leftover(self, path: Path) -> bool:
        """Remove the released view at ``path``; False (logged) if part of it stays."""
        try:
            remove_tree(path)
        except CacheError as exc:
            log.warning("%s; it stays until an agent starts again or an admin removes it", exc)
            return False
        return True

    def leftovers(self) -> list[str]:
        """Released views that still hold something their job made undeletable, sorted."""
        return sorted(os.listdir(self.released))

    def views(self) -> list[str]:
        """Job ids that have a view, sorted."""
        with os.scandir(self.jobs) as found:
            return sorted(e.name for e in found if e.is_dir(follow_symlinks=False))

    # -- reconcile, usage, eviction --------------------------------------------------------

    def reconcile(self) -> ReconcileReport:
        """Make disk and index agree after a crash; run at agent start, before any fetch.

        Deletes every temp file, drops rows whose file is missing or has the wrong size, and
        deletes object files without a row (their bytes cannot be verified). Tries once more to
        remove what released jobs left undeletable (see ``release``). Checksums are not
        re-read: that would cost a full read of the cache at every start. Works one fan-out
        directory at a time, so memory stays small with millions of objects.
        """
        totals = [0, 0, 0, 0, 0]  # temps, dropped rows, orphans, objects, bytes
        with self._lock:
            with os.scandir(self.objects) as top:
                names = [(e.name, e.is_dir(follow_symlinks=False), e.path) for e in top]
            for name, is_dir, path in names:
                if not is_dir:
                    totals[0 if is_temp_name(name) else 2] += 1
                    Path(path).unlink(missing_ok=True)
                elif not _FANOUT.fullmatch(name):
                    totals[2] += self._clear_foreign_dir(Path(path))
            for n in range(256):
                self._reconcile_fanout(f"{n:02x}", totals)
            left = [
                name for name in self.leftovers() if not self._clear_leftover(self.released / name)
            ]
        temps, dropped, orphans, objects, size = totals
        return ReconcileReport(temps, dropped, orphans, objects, size, leftovers=len(left))

    def _reconcile_fanout(self, prefix: str, totals: list[int]) -> None:
        upper = f"{int(prefix, 16) + 1:02x}" if prefix != "ff" else "g"
        sizes = self._index.id_range(prefix, upper)
        kept: set[str] = set()
        try:
            with os.scandir(self.objects / prefix) as inner:
                entries = [e for e in inner if not e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if is_temp_name(entry.name):
                totals[0] += 1
            elif self._is_indexed_file(entry, sizes):
                kept.add(entry.name)
                totals[3] += 1
                totals[4] += sizes[entry.name]
                continue
            else:
                totals[2] += 1
            Path(entry.path).unlink(missing_ok=True)
        for cache_id in sizes.keys() - kept:
            self._index.delete(cache_id)
            totals[1] += 1

    def _clear_foreign_dir(self, path: Path) -> int:
        """Files in a directory of ``objects/`` that no cache_id maps to: remove them."""
        removed = 0
        with os.scandir(path) as inner:
            for entry in list(inner):
                if not entry.is_dir(follow_symlinks=False):
                    Path(entry.path).unlink(missing_ok=True)
                    removed += 1
        return removed

    def _is_indexed_file(self, entry: os.DirEntry[str], sizes: dict[str, int]) -> bool:
        """True if ``entry`` is a regular file at its cache_id's place with the indexed size."""
        if entry.name not in sizes or Path(entry.path) != object_path(self.objects, entry.name):
            return False
        return entry.is_file(follow_symlinks=False) and entry.stat().st_size == sizes[entry.name]

    def usage(self) -> Usage:
        """Indexed bytes and objects, and the part of them leased by job views.

        Streams the index a page at a time (one lstat per object for the lease count).
        """
        count, total, leased_objects, leased_bytes = 0, 0, 0, 0
        for page in self._index.lru():
            for row in page:
                nlink = _link_count(object_path(self.objects, row.cache_id))
                if nlink is None:
                    continue  # lookup() drops the row; nothing here to count
                count, total = count + 1, total + row.size
                if nlink > 1:
                    leased_objects, leased_bytes = leased_objects + 1, leased_bytes + row.size
        return Usage(total, count, leased_bytes, leased_objects)

    def evict(
        self,
        max_bytes: int,
        high: float,
        low: float,
        ttl: float,
        now: float | None = None,
        max_objects: int = 0,
    ) -> list[str]:
        """Evict by the policy in ``cache/evict.py``; return the evicted cache_ids.

        ``max_bytes`` is the cache's capacity, ``high``/``low`` fractions of it (and of
        ``max_objects``, 0 = not counted), ``ttl`` in seconds; ``now`` defaults to the clock.
        Leased objects are never evicted. In-flight downloads are not counted. See
        ``evict_iter`` for caches with very many objects.
        """
        return list(self.evict_iter(max_bytes, high, low, ttl, now, max_objects))

    def evict_iter(
        self,
        max_bytes: int,
        high: float,
        low: float,
        ttl: float,
        now: float | None = None,
        max_objects: int = 0,
    ) -> Iterator[str]:
        """``evict()`` one object at a time: yields each cache_id as it is evicted.

        A pass that has nothing to do costs one aggregate query. Otherwise the index is walked
        oldest access first, a page at a time, and the lock that ``link()`` takes is held per
        object (its lease check and removal), never across the pass.
        """
        when = self._clock() if now is None else now
        count, total, oldest = self._index.summary()
        policy = EvictionPass(
            total, max_bytes, high, low, ttl, when, count=count, max_objects=max_objects
        )
        if count == 0 or not policy.needed(oldest):
            return
        for page in self._index.lru():
            for row in page:
                if self._evict_one(policy, row):
                    yield row.cache_id
                if policy.done:
                    return

    def _evict_one(self, policy: EvictionPass, row: Row) -> bool:
        path = object_path(self.objects, row.cache_id)
        with self._stripe(row.cache_id):
            nlink = _link_count(path)
            if nlink is None:
                policy.forget(row.size)  # lookup() drops the row; nothing here to evict
                return False
            if not policy.offer(Entry(row.cache_id, row.size, row.last_access, nlink > 1)):
                return False
            # Row first: a crash in between leaves an unindexed file, which reconcile removes.
            self._index.delete(row.cache_id)
            path.unlink(missing_ok=True)
        return True


class _Batcher(Generic[_In, _Out]):
    """Runs items submitted on the event loop through ``run`` in worker threads, in groups.

    While a group is in a thread the next one accumulates, so the group size follows the rate
    by itself: one item when idle, hundreds under load, and one thread hop per group instead
    of one per item. Up to ``parallel`` groups run at once (the kernel's file work for one
    group does not wait for another's flush). ``run`` returns, per item, its result or its
    exception.
    """

    def __init__(
        self,
        run: Callable[[list[_In]], list[_Out | BaseException]],
        executor: concurrent.futures.Executor,
        parallel: int,
    ) -> None:
        self._run_group = run
        self._executor = executor
        self._parallel = parallel
        self._waiting: list[tuple[_In, asyncio.Future[_Out]]] = []
        # Runners counted when created and uncounted in their own last step, never in a done
        # callback: that runs later, and an item submitted in between would wait forever.
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()  # strong references only

    async def submit(self, item: _In) -> _Out:
        future: asyncio.Future[_Out] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._active < self._parallel:
            self._active += 1
            runner = asyncio.create_task(self._run(), name="cache-batch")
            self._tasks.add(runner)
            runner.add_done_callback(self._tasks.discard)
        return await future

    async def _run(self) -> None:
        try:
            await self._drain()
        finally:
            self._active -= 1  # no await between the empty check and here

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            group, self._waiting = self._waiting[:GROUP_MAX], self._waiting[GROUP_MAX:]
            try:
                # Shielded: a cancelled waiter must not stop a group half-way (a group
                # commit would leave written files unindexed until the next reconcile).
                results = await asyncio.shield(
                    loop.run_in_executor(
                        self._executor, self._run_group, [item for item, _ in group]
                    )
                )
            except BaseException as exc:  # only a bug or shutdown: run reports per item
                results = [exc] * len(group)
            for (_, future), result in zip(group, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def _syncfs_available() -> bool:
    return _SYNCFS is not None


def _syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` (syncfs(2)); OSError on a reported write error."""
    assert _SYNCFS is not None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")
    finally:
        os.close(fd)


_SYNCFS = libc_function("syncfs", ctypes.c_int)


def _check_complete(ref: ObjectRef, size: int, sha256_hex: str) -> None:
    """CacheError unless ``size`` bytes are what ``ref`` lists and the digest looks like one.

    Objects up to GROUP_COMMIT_MAX must come with their SHA-256 (peer copy checks it); bigger
    ones may come without ("": downloads do not hash them twice, see hpcstage.store.s3)."""
    if not _SHA256.fullmatch(sha256_hex) and (sha256_hex or ref.size <= GROUP_COMMIT_MAX):
        raise CacheError(f"not a sha256 hex digest: {sha256_hex!r}")
    if size != ref.size:
        raise CacheError(f"object {ref.key!r} has {size} bytes, expected {ref.size}")


def _link_count(path: Path) -> int | None:
    """Hard links of the file at ``path`` (a job view's link makes it > 1), None if missing."""
    try:
        return path.lstat().st_nlink
    except FileNotFoundError:
        return None


def _file_size(path: Path) -> int | None:
    """Size of the regular file at ``path``, or None if it is missing or not a regular file."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None

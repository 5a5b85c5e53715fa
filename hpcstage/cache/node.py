"""The node cache: immutable objects keyed by source identity, job views, leases and eviction.

One directory per node, owned by the agent's service account (layout in ``cache/layout.py``).
``NodeCache`` is the one door to it and wires its parts: objects are written crash-safely, one
at a time or in group commits, by ``cache/commit.py`` (no row ever names partial bytes); groups
are gathered from the event loop by ``cache/batch.py``; large objects are readable once
verified and made durable in the background (``cache/durable.py``, unless
``durable_before_read``); ``reconcile()`` (``cache/reconcile.py``, ``cache/durable.py``)
removes at agent start what a crash left (a temp file, a file without a row, unsynced bytes it
cannot vouch for), which no lookup ever returns; the index is ``cache/index.py``, views
``cache/views.py``, the eviction policy ``cache/evict.py``. Here: lookups, single-flight
fetches, what peers may read, job views and their leases, usage and eviction.

Leases are hardlinks: an object is leased while any job view links it (``st_nlink > 1``), and
eviction never removes a leased object. ``link()`` and ``evict()`` take the object's lock (one
of 64 stripes), so a lease checked by eviction cannot be created behind its back.

One agent process owns a cache directory; the methods are synchronous and quick (the agent may
call them from worker threads), except ``ensure()``, the asyncio entry point for fetching.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, BinaryIO

from hpcstage.cache.batch import Batcher
from hpcstage.cache.commit import (
    GROUP_COMMIT_MAX,
    Committer,
    GroupItem,
    PendingObject,
    SmallObject,
)
from hpcstage.cache.durable import Flusher, recheck_unsynced
from hpcstage.cache.evict import Entry, EvictionPass
from hpcstage.cache.index import Index, Row, TreeRow
from hpcstage.cache.layout import (
    INDEX,
    JOBS,
    NO_GUARD,
    OBJECTS,
    RELEASED,
    Guard,
    boot_id,
    check_job_id,
    make_dir,
    object_path,
)
from hpcstage.cache.reconcile import ReconcileReport, sweep_objects
from hpcstage.cache.trees import PackedTrees
from hpcstage.cache.views import ViewLinker, check_dest, remove_tree
from hpcstage.core.identity import ObjectRef
from hpcstage.errors import CacheError, FencedError

log = logging.getLogger(__name__)

_STRIPES = 64
BATCH_PARALLEL = 2  # group commits (and, separately, link groups) running at once


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
    peer_refused: int = 0  # peer copies refused or not read (fetched from the store later)


@dataclass(frozen=True)
class Usage:
    """Bytes and objects in the cache, and how much of it job views hold leased."""

    bytes: int
    objects: int
    leased_bytes: int
    leased_objects: int
    # Packed trees (cache/trees.py), counted in bytes and leased_bytes above as well.
    trees: int = 0
    tree_bytes: int = 0
    tree_inodes: int = 0
    leased_trees: int = 0


Fetch = Callable[[PendingObject], Awaitable[str]]
ReadSmall = Callable[[], Awaitable[tuple[bytes, str]]]

ROOT_MODE = 0o711
# Sticky like every directory the agent makes in a view (see cache/views.py).
VIEW_MODE = 0o1700


class NodeCache:
    """A node-local cache directory: objects, their index, and per-job views."""

    def __init__(
        self,
        root: Path,
        *,
        clock: Callable[[], float] = time.time,
        durable_before_read: bool = False,
        boot: str = "",
        guard: Guard = NO_GUARD,
    ) -> None:
        """Open (creating if needed) the cache at ``root``; ``clock`` gives Unix times.

        ``durable_before_read``: flush every object before it is indexed (the agent takes the
        site's ``cache.durable_before_read`` from the daemon's hello); by default large objects
        are readable once verified and flushed in the background. ``boot``: this kernel's boot
        id, read from /proc when "" (tests give another to play a reboot). ``guard``: held by
        every commit from its last check to its index row (the agent's leader epoch fence,
        cache/fence.py).
        """
        self.durable_before_read = durable_before_read
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
        self._guard = guard
        self._committer = Committer(self.objects, self._index, clock, guard)
        self.trees = PackedTrees(self.root, self._index, clock, guard)
        self._boot = boot or boot_id()
        self._flusher = Flusher(self.objects, self._index, self._drop_object)
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
        self._group: Batcher[GroupItem, Path] = Batcher(
            self.commit_group, self._threads, BATCH_PARALLEL
        )
        self._linker: Batcher[tuple[str, PurePosixPath | str, Path], Path] = Batcher(
            self.link_many, self._threads, BATCH_PARALLEL
        )

    def close(self) -> None:
        """Flush what is still unsynced, close the index; the cache is unusable afterwards."""
        self._threads.shutdown(wait=True, cancel_futures=True)
        self._flusher.close()
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
        return self._committer.begin(ref)

    def commit(self, pending: PendingObject, sha256_hex: str) -> Path:
        """Make ``pending`` a complete, read-only, indexed object and return its path.

        An object above ``GROUP_COMMIT_MAX`` is readable at once, from the page cache, and
        flushed in the background, unless ``durable_before_read`` (see ``cache/durable.py``).
        Raises CacheError (after aborting) if the size differs from ``ref.size``, the checksum
        is not 64 hex digits, or the disk fails.
        """
        if self.durable_before_read or pending.ref.size <= GROUP_COMMIT_MAX:
            return self._committer.commit(pending, sha256_hex)
        path = self._committer.commit(pending, sha256_hex, unsynced=self._boot)
        self._flusher.add(pending.ref.cache_id)
        return path

    def wait_durable(self, timeout: float | None = None) -> bool:
        """Wait until every object committed so far is on disk; False if ``timeout`` passed."""
        return self._flusher.wait(timeout)

    def _drop_object(self, cache_id: str) -> None:
        """Forget an object and delete its file (its flush failed), under its lock."""
        with self._stripe(cache_id):
            self._index.delete(cache_id)
            object_path(self.objects, cache_id).unlink(missing_ok=True)

    def commit_group(self, items: list[GroupItem]) -> list[Path | BaseException]:
        """``commit()`` for many small objects with one flush and one index transaction; per
        item its object path or the exception that aborted it (see ``cache/commit.py``)."""
        return self._committer.commit_group(items)

    def abort(self, pending: PendingObject) -> None:
        """Drop an in-flight download: close and delete its temp file (idempotent)."""
        self._committer.abort(pending)

    # -- singleflight ----------------------------------------------------------------------

    async def ensure(self, ref: ObjectRef, fetch: Fetch, peer: bool = False) -> Path:
        """Return ``ref``'s object path, running ``fetch`` at most once per object at a time.

        ``fetch`` writes the bytes to ``pending.fd`` and returns their sha256 hex digest.
        Concurrent calls for the same object share one fetch and its result or exception; on
        failure the temp file is removed. One caller being cancelled does not cancel the fetch.
        ``peer``: the bytes come from another node's cache (counted apart from the store's).
        """
        return await self._singleflight(ref, lambda: self._fetch(ref, fetch, peer))

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

    async def _fetch(self, ref: ObjectRef, fetch: Fetch, peer: bool = False) -> Path:
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
            # A rename and a row (an fsync too if durable_before_read): off the event loop. commit()
            # aborts by itself on failure, so a cancelled await here leaves nothing half-done.
            path = await asyncio.to_thread(self.commit, pending, digest)
        if peer:
            self.stats.peer_objects += 1
            self.stats.peer_bytes += ref.size
        else:
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

    def indexed(self, cache_id: str) -> Row | None:
        """The index row of ``cache_id``, or None (no access recorded)."""
        return self._index.get(cache_id)

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

    def open_object(self, cache_id: str) -> tuple[Row, BinaryIO] | None:
        """An indexed object's row and its file opened for reading, for a peer to stream
        (None: not held, or not the indexed size any more). The caller closes the file; an
        eviction meanwhile removes the name, not the bytes the open file still reads."""
        row = self._index.get(cache_id)
        if row is None:
            return None
        try:
            file = open(object_path(self.objects, cache_id), "rb")  # noqa: SIM115 (returned)
        except OSError:
            return None
        if os.fstat(file.fileno()).st_size != row.size:
            file.close()
            return None
        return row, file

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
        with self._guard(), ViewLinker() as linker:
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
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self._guard())
            except FencedError as exc:  # a newer leader's agent owns the cache: no links
                return [exc for _ in items]
            linker = held.enter_context(ViewLinker())
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

        First settles the objects a crash left readable but not yet durable: flushed if this
        kernel still holds them, re-verified against their SHA-256 or else discarded if it
        restarted (see ``recheck_unsynced`` in ``cache/durable.py``). Then deletes every temp
        file, drops rows whose file is missing or has the wrong size, and deletes object files
        without a row (their bytes cannot be verified; see ``cache/reconcile.py``). Tries once
        more to remove what released jobs left undeletable (see ``release``).
        """
        with self._lock:
            recheck = recheck_unsynced(self.objects, self._index, self._boot)
            report = sweep_objects(self.objects, self._index)
            trees = self.trees.reconcile()
            left = [
                name for name in self.leftovers() if not self._clear_leftover(self.released / name)
            ]
        return dataclasses.replace(
            report,
            leftovers=len(left),
            trees_removed=trees,
            unsynced_flushed=len(recheck.flushed),
            unsynced_verified=len(recheck.verified),
            unsynced_dropped=len(recheck.dropped),
        )

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
        trees, leased = self.trees.rows(), self.trees.leased()
        tree_bytes = sum(t.bytes for t in trees)
        leased_trees = [t for t in trees if t.tree_id in leased]
        return Usage(
            total + tree_bytes,
            count,
            leased_bytes + sum(t.bytes for t in leased_trees),
            leased_objects,
            trees=len(trees),
            tree_bytes=tree_bytes,
            tree_inodes=sum(t.inodes for t in trees),
            leased_trees=len(leased_trees),
        )

    def totals(self) -> tuple[int, int]:
        """(bytes, objects) the cache holds, packed trees' bytes and inodes included: one
        aggregate query, unlike ``usage()``'s lstat of every object (for leases)."""
        count, total, _oldest = self._index.summary()
        trees = self.trees.rows()
        return total + sum(t.bytes for t in trees), count + sum(t.inodes for t in trees)

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
        # Trees count with their bytes and inodes, and go in one LRU order with objects.
        trees, leased = self.trees.rows(), self.trees.leased()
        total += sum(t.bytes for t in trees)
        count += sum(t.inodes for t in trees)
        if trees:
            first = trees[0].last_used
            oldest = first if oldest is None else min(oldest, first)
        policy = EvictionPass(
            total, max_bytes, high, low, ttl, when, count=count, max_objects=max_objects
        )
        if count == 0 or not policy.needed(oldest):
            return
        waiting = iter(trees)
        tree = next(waiting, None)
        for page in self._index.lru():
            for row in page:
                while tree is not None and (tree.last_used, "") < (row.last_access, row.cache_id):
                    yield from self._evict_tree(policy, tree, tree.tree_id in leased)
                    tree = None if policy.done else next(waiting, None)
                if policy.done:
                    return
                if self._evict_one(policy, row):
                    yield row.cache_id
                if policy.done:
                    return
        while tree is not None and not policy.done:
            yield from self._evict_tree(policy, tree, tree.tree_id in leased)
            tree = next(waiting, None)

    def evict_source(self, store: str, bucket: str, key: str, exact: bool) -> Dropped:
        """Evict every cached version of the objects of one source (the key ``key`` when
        ``exact``, else every key under the prefix ``key``), whatever the policy says, except
        those a job's view links: they stay, counted as in use (``hpcstage cache evict SRC``).

        The index is walked a page at a time; each object's lease check and removal happen
        under the lock ``link()`` takes, so a job linking it meanwhile keeps it."""
        done, after = Dropped(), ("", "")
        while rows := self._index.versions(store, bucket, key, exact, after):
            for row in rows:
                leased = self._drop_unleased(row)
                if leased is not None:
                    done = done.plus(row.size, leased)
            after = (rows[-1].key, rows[-1].cache_id)
        return done

    def _drop_unleased(self, row: Row) -> bool | None:
        """Evict ``row``'s object unless leased: True if leased (kept), False if evicted,
        None if its file was already gone (the row is dropped, nothing counted)."""
        path = object_path(self.objects, row.cache_id)
        with self._stripe(row.cache_id):
            nlink = _link_count(path)
            if nlink is not None and nlink > 1:
                return True
            # Row first: a crash in between leaves an unindexed file, which reconcile removes.
            self._index.delete(row.cache_id)
            path.unlink(missing_ok=True)
        return None if nlink is None else False

    def _evict_tree(self, policy: EvictionPass, tree: TreeRow, leased: bool) -> Iterator[str]:
        entry = Entry(f"tree:{tree.tree_id}", tree.bytes, tree.last_used, leased, tree.inodes)
        if policy.offer(entry) and self.trees.evict(tree.tree_id):
            yield entry.cache_id

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


@dataclass(frozen=True)
class Dropped:
    """What ``evict_source`` did: objects (and bytes) evicted, and those kept because a job's
    view links them."""

    evicted: int = 0
    evicted_bytes: int = 0
    in_use: int = 0
    in_use_bytes: int = 0

    def plus(self, size: int, leased: bool) -> Dropped:
        if leased:
            return dataclasses.replace(
                self, in_use=self.in_use + 1, in_use_bytes=self.in_use_bytes + size
            )
        return dataclasses.replace(
            self, evicted=self.evicted + 1, evicted_bytes=self.evicted_bytes + size
        )


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

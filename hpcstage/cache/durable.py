"""Making readable objects durable off the critical path, and what a crash leaves unsynced.

A cache need not be on disk before a job reads it, only correct: a large object is readable as
soon as its bytes are complete and verified, from the page cache (``Committer.commit`` with
``unsynced``), and its row records the boot id of the kernel holding those bytes. ``Flusher``
then flushes such objects in one background thread (fdatasync of each, or one syncfs(2) when
many are waiting) and marks their rows durable. What a crash does to the rows still unsynced is
``recheck_unsynced``'s business, at reconcile.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpcstage.cache.commit import syncfs, syncfs_available
from hpcstage.cache.index import Index, Row
from hpcstage.cache.layout import fsync_dir, object_path

log = logging.getLogger(__name__)

SYNCFS_FROM = 16  # objects waiting at once: one syncfs(2) instead of one fdatasync each
_HASH_CHUNK = 1 << 20


class Flusher:
    """Flushes unsynced objects to disk in its one thread and marks their rows durable.

    ``drop(cache_id)`` removes an object whose flush failed (a write error: the disk may not
    hold its bytes, so it must not outlive the page cache's copy).
    """

    def __init__(self, objects: Path, index: Index, drop: Callable[[str], None]) -> None:
        self._objects = objects
        self._index = index
        self._drop = drop
        self._cond = threading.Condition()
        self._waiting: list[str] = []
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="node-cache-flush", daemon=True)
        self._thread.start()

    def add(self, cache_id: str) -> None:
        """Flush ``cache_id`` soon (its row says which bytes are still to be flushed)."""
        with self._cond:
            self._waiting.append(cache_id)
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until everything added so far is flushed; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._waiting and not self._busy, timeout)

    def close(self) -> None:
        """Flush what is waiting, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._closed)
                if not self._waiting:
                    return
                batch, self._waiting, self._busy = self._waiting, [], True
            try:
                self._flush(batch)
            except Exception:  # the thread must live on: the rows stay unsynced, reconcile checks
                log.exception("cannot make %d cached objects durable", len(batch))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _flush(self, batch: list[str]) -> None:
        rows = [row for row in map(self._index.get, dict.fromkeys(batch)) if row and row.unsynced]
        if not rows:
            return
        if len(rows) >= SYNCFS_FROM and syncfs_available():
            syncfs(self._objects)  # flushes every file and directory entry of the cache
            flushed = rows
        else:
            flushed = [row for row in rows if self._flush_one(row)]
        self._index.mark_durable([(row.cache_id, row.created) for row in flushed])

    def _flush_one(self, row: Row) -> bool:
        """fdatasync the object and its directory entry; False if it is gone or was dropped."""
        path = object_path(self._objects, row.cache_id)
        try:
            fdatasync_path(path)
            fsync_dir(path.parent)
        except FileNotFoundError:
            return False  # evicted meanwhile: nothing to flush, no row to mark
        except OSError as exc:
            log.warning("dropping cached object %s: cannot flush it: %s", row.cache_id, exc)
            self._drop(row.cache_id)
            return False
        return True


def fdatasync_path(path: Path) -> None:
    """Flush the data of the file at ``path`` (read-only objects can be flushed read-only)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Recheck:
    """What ``recheck_unsynced`` did with the rows a crash left unsynced."""

    flushed: list[str]  # same boot: the page cache still holds the verified bytes
    verified: list[str]  # another boot, and the file still has the recorded SHA-256
    dropped: list[str]  # another boot, and the bytes could not be (or were not) vouched for


def recheck_unsynced(objects: Path, index: Index, boot: str) -> Recheck:
    """Settle every unsynced row at reconcile (files of the wrong size are gone already).

    - Written under this boot (only the agent died): the kernel still holds the bytes the agent
      verified, so they are correct; they are flushed now and the row marked durable.
    - Written under another boot (power loss, kernel crash): the file may hold zeros or old
      blocks at the right size. A row with a SHA-256 (objects up to 1 MiB, and bigger ones
      whose fetch hashed them) is re-verified: the file is read and hashed again, and kept
      (flushed, marked durable) only if it matches. A row without one (big downloads are
      checked against the store's CRC or ETag as their bytes arrive and not hashed again, so
      nothing on record can check the file) is discarded: its row and file go, and the next
      job that needs the object fetches it again. That costs one fetch of what was staged in
      the seconds before the crash, never a wrong byte.

    Dropped rows go before their files, as in eviction: a crash in between leaves an
    unindexed file, which the next reconcile removes.
    """
    flushed: list[str] = []
    verified: list[str] = []
    dropped: list[str] = []
    for row in index.unsynced():
        path = object_path(objects, row.cache_id)
        if row.unsynced == boot:
            group = flushed
        elif row.sha256 and _sha256_of(path) == row.sha256:
            group = verified
        else:
            index.delete(row.cache_id)
            path.unlink(missing_ok=True)
            dropped.append(row.cache_id)
            continue
        try:
            fdatasync_path(path)
            fsync_dir(path.parent)
        except OSError as exc:
            log.warning("dropping cached object %s: cannot flush it: %s", row.cache_id, exc)
            index.delete(row.cache_id)
            path.unlink(missing_ok=True)
            dropped.append(row.cache_id)
            continue
        index.mark_durable([(row.cache_id, row.created)])
        group.append(row.cache_id)
    return Recheck(flushed, verified, dropped)


def _sha256_of(path: Path) -> str:
    """The SHA-256 hex digest of the file at ``path``; "" if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as file:
            while chunk := file.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()

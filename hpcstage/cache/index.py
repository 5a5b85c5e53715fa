"""The node cache's index: one SQLite row per complete object (stdlib sqlite3, WAL mode), one
per materialised packed tree and one per job's lease on a tree (never one per file of a tree).

A row is written only after its object (or tree) was verified and renamed into place, so a
row always names complete bytes; the reverse (a file without a row) is cleaned up by
``NodeCache.reconcile``. An object row's ``unsynced`` says whether its bytes are on disk yet:
large objects become readable from the page cache and are flushed afterwards (see
``cache/durable.py``); a tree row's ``durable`` says the same of a tree (``cache/trees.py``).

Schema 2 added ``unsynced`` and the ``trees`` and ``tree_leases`` tables; an index of schema 1
gains them when opened (every old row was flushed before it was written, so it is durable: "").
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from pathlib import Path

from hpcstage.errors import CacheError

SCHEMA_VERSION = 2
PAGE = 1000  # rows per page when walking the whole index
# The keys of every user's cached objects are nobody else's business, in the database and in
# the WAL and shared-memory files next to it (SQLite gives those the database file's mode).
FILE_MODE = 0o600
_SIDE_FILES = ("-wal", "-shm", "-journal")
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    cache_id    TEXT PRIMARY KEY,
    store       TEXT NOT NULL,
    bucket      TEXT NOT NULL,
    key         TEXT NOT NULL,
    etag        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,  -- "" for objects above 1 MiB (see hpcstage.store.protocol)
    created     REAL NOT NULL,
    last_access REAL NOT NULL,
    unsynced    TEXT NOT NULL DEFAULT ''  -- see Row.unsynced
)
"""
# A packed dataset's selection materialised once per node (cache/trees.py): counts, not files.
_TREES = """
CREATE TABLE IF NOT EXISTS trees (
    tree_id     TEXT PRIMARY KEY,
    dataset     TEXT NOT NULL,     -- the dataset's URL (its prefix, ending in .hpack/)
    version     INTEGER NOT NULL,
    subtree     TEXT NOT NULL,
    files       INTEGER NOT NULL,
    dirs        INTEGER NOT NULL,
    bytes       INTEGER NOT NULL,
    durable     INTEGER NOT NULL,  -- 1 once a syncfs after the build returned
    boot_id     TEXT NOT NULL,     -- the boot it was built in (not durable: lost on power cut)
    created     REAL NOT NULL,
    last_used   REAL NOT NULL
)
"""
_TREE_LEASES = """
CREATE TABLE IF NOT EXISTS tree_leases (
    tree_id     TEXT NOT NULL,
    job         TEXT NOT NULL,
    user        TEXT NOT NULL,
    PRIMARY KEY (tree_id, job)
)
"""
_TREE_COLUMNS = (
    "tree_id, dataset, version, subtree, files, dirs, bytes, durable, boot_id, created, last_used"
)
_TREE_SELECT = f"SELECT {_TREE_COLUMNS} FROM trees"  # noqa: S608 - constant column names
_TREE_INSERT = (
    f"INSERT OR REPLACE INTO trees ({_TREE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
)
_ADD_UNSYNCED = "ALTER TABLE objects ADD COLUMN unsynced TEXT NOT NULL DEFAULT ''"
_COLUMNS = "cache_id, store, bucket, key, etag, size, sha256, created, last_access, unsynced"
_SELECT = f"SELECT {_COLUMNS} FROM objects"  # noqa: S608 (constants only)
_INSERT = f"INSERT OR REPLACE INTO objects ({_COLUMNS}) VALUES ({', '.join('?' * 10)})"  # noqa: S608


def make_private(path: Path) -> None:
    """Create the database file ``FILE_MODE`` before SQLite opens it, whatever the umask, and
    narrow its side files: an older hpcstage created them 0644, and a killed agent leaves
    them behind for the next one to reuse. CacheError if a file cannot be opened or changed."""
    try:
        _chmod_open(path, os.O_RDWR | os.O_CREAT)
        for suffix in _SIDE_FILES:
            try:
                _chmod_open(path.with_name(path.name + suffix), os.O_RDONLY)
            except FileNotFoundError:
                continue
    except OSError as exc:
        raise CacheError(f"cannot make the cache index private: {exc}") from exc


def _chmod_open(path: Path, flags: int) -> None:
    """Open ``path`` without following a symlink and set its mode to ``FILE_MODE``."""
    fd = os.open(path, flags | _OPEN_FLAGS, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Row:
    """One indexed object: its source identity, verified size, SHA-256 ("" for objects above
    GROUP_COMMIT_MAX: downloads do not hash big objects twice), its times, and whether its
    bytes are on disk yet: ``unsynced`` is the boot id of the kernel whose page cache held
    them when they were verified and not yet flushed, "" once they are durable."""

    cache_id: str
    store: str
    bucket: str
    key: str
    etag: str
    size: int
    sha256: str
    created: float
    last_access: float
    unsynced: str = ""


class Index:
    """Thread-safe access to ``index.db``; every method is one short autocommitted statement."""

    def __init__(self, path: Path) -> None:
        # The agent calls the cache from worker threads; one lock serializes the connection.
        self._lock = threading.Lock()
        make_private(path)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._setup()
        except BaseException:
            self._db.close()
            raise

    def _setup(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise CacheError(
                f"cache index has schema {version}; this hpcstage knows {SCHEMA_VERSION}"
            )
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode may lose the last rows on power loss but never corrupts; a lost row
        # only leaves an unindexed file that reconcile deletes and a later job fetches again.
        self._db.execute("PRAGMA synchronous=NORMAL")
        # `hpcstage cache ls` may read while the agent writes.
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(_SCHEMA)
        columns = {info[1] for info in self._db.execute("PRAGMA table_info(objects)")}
        if "unsynced" not in columns:  # schema 1: every row was flushed before it was written
            self._db.execute(_ADD_UNSYNCED)
        # Eviction walks objects oldest access first, a page at a time (no full sort per page).
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS objects_lru ON objects (last_access, cache_id)"
        )
        # Peers ask what this cache holds of a source (a prefix of a bucket), a page at a time.
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS objects_source ON objects (store, bucket, key, created)"
        )
        self._db.execute(_TREES)
        self._db.execute(_TREE_LEASES)
        # Reconcile looks at the rows not yet durable: few, usually none.
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS objects_unsynced ON objects (unsynced) WHERE unsynced != ''"
        )
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection; the object is unusable afterwards."""
        with self._lock:
            self._db.close()

    def get(self, cache_id: str) -> Row | None:
        """The row for ``cache_id``, or None."""
        with self._lock:
            found = self._db.execute(_SELECT + " WHERE cache_id = ?", (cache_id,)).fetchone()
        return Row(*found) if found else None

    def summary(self) -> tuple[int, int, float | None]:
        """Row count, total bytes and the oldest access (None when empty), in one query."""
        with self._lock:
            count, total, oldest = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0), min(last_access) FROM objects"
            ).fetchone()
        return int(count), int(total), oldest

    def lru(self, page: int | None = None) -> Iterator[list[Row]]:
        """Every row, oldest access first, ``page`` rows at a time (default ``PAGE``).

        The lock is held per page only, so fetches commit in between; rows touched meanwhile
        move behind the cursor and may come again later with their new time.
        """
        after: tuple[float, str] = (-math.inf, "")
        page = page or PAGE
        while True:
            with self._lock:
                found = self._db.execute(
                    _SELECT + " WHERE (last_access, cache_id) > (?, ?)"
                    " ORDER BY last_access, cache_id LIMIT ?",
                    (*after, page),
                ).fetchall()
            if not found:
                return
            rows = [Row(*values) for values in found]
            yield rows
            after = (rows[-1].last_access, rows[-1].cache_id)

    def id_range(self, low: str, high: str) -> dict[str, int]:
        """cache_id -> size for ids with ``low <= cache_id < high`` (one fan-out directory)."""
        with self._lock:
            found = self._db.execute(
                "SELECT cache_id, size FROM objects WHERE cache_id >= ? AND cache_id < ?",
                (low, high),
            ).fetchall()
        return {cache_id: size for cache_id, size in found}

    def under(self, store: str, bucket: str, prefix: str, after: str, limit: int) -> list[Row]:
        """Rows of ``store``/``bucket`` whose key starts with ``prefix`` and sorts after
        ``after``, by key, the newest version of a key first; at most ``limit`` rows."""
        with self._lock:
            found = self._db.execute(
                _SELECT + " WHERE store = ? AND bucket = ? AND key > ? AND key >= ?"
                " AND substr(key, 1, ?) = ? ORDER BY key, created DESC LIMIT ?",
                (store, bucket, after, prefix, len(prefix), prefix, limit),
            ).fetchall()
        return [Row(*values) for values in found]

    def versions(
        self, store: str, bucket: str, key: str, exact: bool, after: tuple[str, str]
    ) -> list[Row]:
        """Every indexed version of the keys ``key`` covers (itself when ``exact``, else the
        keys it prefixes) in ``store``/``bucket``, ordered by (key, cache_id) after ``after``;
        a page of at most PAGE rows. Unlike ``under`` a page never splits a key's versions from
        the next page's (the cursor includes the cache id)."""
        match = "key = ?" if exact else "substr(key, 1, ?) = ?"
        args: tuple[object, ...] = (key,) if exact else (len(key), key)
        with self._lock:
            found = self._db.execute(
                f"{_SELECT} WHERE store = ? AND bucket = ? AND {match}"
                " AND (key, cache_id) > (?, ?) ORDER BY key, cache_id LIMIT ?",
                (store, bucket, *args, *after, PAGE),
            ).fetchall()
        return [Row(*values) for values in found]

    def have(self, cache_ids: list[str]) -> set[str]:
        """Those of ``cache_ids`` that have a row (one primary-key probe each)."""
        probe = "SELECT 1 FROM objects WHERE cache_id = ?"
        with self._lock:
            return {i for i in cache_ids if self._db.execute(probe, (i,)).fetchone()}

    def put_many(self, rows: list[Row]) -> None:
        """Insert or replace several rows in one transaction (one WAL commit)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(_INSERT, [astuple(row) for row in rows])
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def put(self, row: Row) -> None:
        """Insert or replace the row for ``row.cache_id``."""
        with self._lock:
            self._db.execute(_INSERT, astuple(row))

    def unsynced(self) -> list[Row]:
        """Every row whose bytes were not yet known to be on disk."""
        with self._lock:
            found = self._db.execute(_SELECT + " WHERE unsynced != ''").fetchall()
        return [Row(*values) for values in found]

    def mark_durable(self, rows: list[tuple[str, float]]) -> None:
        """Mark these (cache_id, created) rows durable in one transaction. ``created`` keeps a
        row that replaced the flushed one meanwhile (evicted and fetched again) unsynced."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "UPDATE objects SET unsynced = '' WHERE cache_id = ? AND created = ?", rows
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def touch(self, cache_id: str, when: float) -> None:
        """Record an access, for LRU eviction."""
        with self._lock:
            self._db.execute(
                "UPDATE objects SET last_access = ? WHERE cache_id = ?", (when, cache_id)
            )

    def delete(self, cache_id: str) -> None:
        """Forget ``cache_id`` (no error if absent)."""
        with self._lock:
            self._db.execute("DELETE FROM objects WHERE cache_id = ?", (cache_id,))

    # -- packed trees (cache/trees.py) -----------------------------------------------------

    def tree(self, tree_id: str) -> TreeRow | None:
        """The row of tree ``tree_id``, or None."""
        with self._lock:
            found = self._db.execute(_TREE_SELECT + " WHERE tree_id = ?", (tree_id,)).fetchone()
        return TreeRow(*found) if found else None

    def trees(self) -> list[TreeRow]:
        """Every tree, least recently used first (a row per dataset selection: few)."""
        with self._lock:
            found = self._db.execute(_TREE_SELECT + " ORDER BY last_used, tree_id").fetchall()
        return [TreeRow(*values) for values in found]

    def put_tree(self, row: TreeRow) -> None:
        """Insert or replace a tree's row."""
        with self._lock:
            self._db.execute(
                _TREE_INSERT,
                astuple(row),
            )

    def tree_durable(self, tree_id: str) -> None:
        """Record that the tree's files reached the disk."""
        with self._lock:
            self._db.execute("UPDATE trees SET durable = 1 WHERE tree_id = ?", (tree_id,))

    def touch_tree(self, tree_id: str, when: float) -> None:
        with self._lock:
            self._db.execute("UPDATE trees SET last_used = ? WHERE tree_id = ?", (when, tree_id))

    def delete_tree(self, tree_id: str) -> None:
        """Forget a tree and its leases."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM tree_leases WHERE tree_id = ?", (tree_id,))
            self._db.execute("DELETE FROM trees WHERE tree_id = ?", (tree_id,))
            self._db.execute("COMMIT")

    def lease_tree(self, tree_id: str, job: str, user: str) -> None:
        """Record that ``job`` (run by ``user``) uses the tree."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO tree_leases (tree_id, job, user) VALUES (?, ?, ?)",
                (tree_id, job, user),
            )

    def tree_leases(self, tree_id: str | None = None) -> list[tuple[str, str, str]]:
        """(tree_id, job, user) of every lease, or of one tree's."""
        query = "SELECT tree_id, job, user FROM tree_leases"
        args: tuple[str, ...] = ()
        if tree_id is not None:
            query, args = query + " WHERE tree_id = ?", (tree_id,)
        with self._lock:
            return [(t, j, u) for t, j, u in self._db.execute(query, args).fetchall()]

    def drop_job_leases(self, job: str) -> list[tuple[str, str, str]]:
        """End every tree lease of ``job``; the (tree_id, job, user) that were ended."""
        with self._lock:
            found = self._db.execute(
                "SELECT tree_id, job, user FROM tree_leases WHERE job = ?", (job,)
            ).fetchall()
            self._db.execute("DELETE FROM tree_leases WHERE job = ?", (job,))
        return [(t, j, u) for t, j, u in found]


@dataclass(frozen=True)
class TreeRow:
    """One materialised selection of a packed dataset version (see cache/trees.py)."""

    tree_id: str
    dataset: str
    version: int
    subtree: str
    files: int
    dirs: int
    bytes: int
    durable: int
    boot_id: str
    created: float
    last_used: float

    @property
    def inodes(self) -> int:
        return self.files + self.dirs + 2  # its files and directories, its root and top

"""Making the node cache's files and its index agree after a crash (run at agent start).

(Objects indexed but not yet flushed are settled before this sweep, by
``cache/durable.py``'s ``recheck_unsynced``.)

Every temp file goes (an interrupted download); every row whose file is missing or has the wrong
size goes; every object file without a row goes, since its bytes cannot be verified. Checksums
are not re-read: that would cost a full read of the cache at every start. The walk is one
fan-out directory at a time, so memory stays small with millions of objects.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hpcstage.cache.index import Index
from hpcstage.cache.layout import is_temp_name, object_path

_FANOUT = re.compile(r"[0-9a-f]{2}")


@dataclass(frozen=True)
class ReconcileReport:
    """What ``reconcile()`` cleaned up, and what it kept."""

    temps_removed: int
    rows_dropped: int
    orphans_removed: int
    objects: int
    bytes: int
    leftovers: int = 0  # released views still holding what their job made undeletable
    trees_removed: int = 0  # packed trees half built, unindexed or lost (cache/trees.py)
    # Objects a crash left readable but not durable (see cache/durable.py: recheck_unsynced):
    unsynced_flushed: int = 0  # same boot: flushed and kept
    unsynced_verified: int = 0  # another boot: hashed again, matched, kept
    unsynced_dropped: int = 0  # another boot: not vouched for, row and file removed


@dataclass
class _Tally:
    """Running counts of one sweep."""

    temps: int = 0
    dropped: int = 0
    orphans: int = 0
    objects: int = 0
    bytes: int = 0


def sweep_objects(objects: Path, index: Index) -> ReconcileReport:
    """Remove what the index cannot vouch for under ``objects`` and rows without their file.

    The caller holds the cache's lock; ``leftovers`` of the report is 0 (released views are
    the cache's business, not this sweep's).
    """
    tally = _Tally()
    with os.scandir(objects) as top:
        names = [(e.name, e.is_dir(follow_symlinks=False), e.path) for e in top]
    for name, is_dir, path in names:
        if not is_dir:
            if is_temp_name(name):
                tally.temps += 1
            else:
                tally.orphans += 1
            Path(path).unlink(missing_ok=True)
        elif not _FANOUT.fullmatch(name):
            tally.orphans += _clear_foreign_dir(Path(path))
    for n in range(256):
        _sweep_fanout(objects, index, f"{n:02x}", tally)
    return ReconcileReport(tally.temps, tally.dropped, tally.orphans, tally.objects, tally.bytes)


def _sweep_fanout(objects: Path, index: Index, prefix: str, tally: _Tally) -> None:
    upper = f"{int(prefix, 16) + 1:02x}" if prefix != "ff" else "g"
    sizes = index.id_range(prefix, upper)
    kept: set[str] = set()
    try:
        with os.scandir(objects / prefix) as inner:
            entries = [e for e in inner if not e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        entries = []
    for entry in entries:
        if is_temp_name(entry.name):
            tally.temps += 1
        elif _is_indexed_file(objects, entry, sizes):
            kept.add(entry.name)
            tally.objects += 1
            tally.bytes += sizes[entry.name]
            continue
        else:
            tally.orphans += 1
        Path(entry.path).unlink(missing_ok=True)
    for cache_id in sizes.keys() - kept:
        index.delete(cache_id)
        tally.dropped += 1


def _clear_foreign_dir(path: Path) -> int:
    """Files in a directory of ``objects/`` that no cache_id maps to: remove them."""
    removed = 0
    with os.scandir(path) as inner:
        for entry in list(inner):
            if not entry.is_dir(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


def _is_indexed_file(objects: Path, entry: os.DirEntry[str], sizes: dict[str, int]) -> bool:
    """True if ``entry`` is a regular file at its cache_id's place with the indexed size."""
    if entry.name not in sizes or Path(entry.path) != object_path(objects, entry.name):
        return False
    return entry.is_file(follow_symlinks=False) and entry.stat().st_size == sizes[entry.name]

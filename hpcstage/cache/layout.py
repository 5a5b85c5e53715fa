"""What a node cache directory looks like on disk, and the naming rules that keep it safe.

    CACHE/objects/ab/abcdef...               immutable object bytes, named by cache_id (0444)
    CACHE/objects/ab/abcdef....tmp-<random>  in-flight downloads, deleted at reconcile
    CACHE/index.db                           SQLite index (WAL): one row per complete object
    CACHE/agent.lock                         held (flock) by the one agent using this cache
    CACHE/epoch                              the newest leader epoch claimed here (JSON line;
                                             cache/fence.py), CACHE/epoch.lock orders its use
    CACHE/jobs/<job_id>/...                  a job's view ($HPCSTAGE_DIR): hardlinks to objects
    CACHE/released/<job_id>.<random>/...     what a released view's job made undeletable (0700)
    CACHE/uploads/<job_id>/<hash>.json       multipart uploads a job's stage-out opened and has
                                             not ended (hpcstage.store.recycle.UploadJournal)
    CACHE/packed/<tree_id>/root/...          a packed dataset's selection, materialised once per
                                             node (files 0444, dirs 0555; cache/trees.py)
    CACHE/packed/<tree_id>.tmp-<random>/     a tree being built, deleted at reconcile

Every name under ``objects/`` is derived from a cache_id (64 hex digits), and every name directly
under ``packed/`` from a tree id (32 hex digits), never from an S3 key or a user path, so nothing
a user controls can steer where the agent writes. (Inside a tree, files are named by a
manifest's paths, each checked by ``core.packed.check_member_path``.)
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from hpcstage.errors import CacheError

OBJECTS = "objects"
JOBS = "jobs"
RELEASED = "released"
INDEX = "index.db"
LOCK = "agent.lock"
EPOCH = "epoch"
EPOCH_LOCK = "epoch.lock"

# What a commit holds from its last check to its last rename and index row: the agent's
# ``EpochFence.guard`` (cache/fence.py), which refuses the commit once a newer leader epoch is
# recorded; nothing where no daemon fences the cache (tests, tools).
Guard = Callable[[], AbstractContextManager[None]]
NO_GUARD: Guard = nullcontext

log = logging.getLogger(__name__)

# objects/ and views must be traversable by job users; a later issue narrows views with ACLs.
DIR_MODE = 0o755
OBJECT_MODE = 0o444

_CACHE_ID = re.compile(r"[0-9a-f]{64}")
# Slurm job ids: "123", array tasks "123_4", het jobs "123+1"; nothing that could name a path.
_JOB_ID = re.compile(r"[0-9A-Za-z_+-][0-9A-Za-z_.+-]{0,63}")
TEMP_MARK = ".tmp-"


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_PROCESS_BOOT = f"process-{secrets.token_hex(8)}"


def boot_id() -> str:
    """This kernel's boot id: what tells whether bytes not yet flushed (objects, packed trees)
    can still be in the page cache. Where it cannot be read, a token new to this process, so
    that whatever is not durable counts as left by another boot (checked again, never
    trusted)."""
    try:
        found = BOOT_ID.read_text().strip()
    except OSError:
        found = ""
    return found or _PROCESS_BOOT


def check_cache_id(cache_id: str) -> str:
    """Return ``cache_id`` if it is 64 lowercase hex digits, else raise CacheError."""
    if not _CACHE_ID.fullmatch(cache_id):
        raise CacheError(f"not a cache id: {cache_id!r}")
    return cache_id


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is safe as one path component, else raise CacheError."""
    if not _JOB_ID.fullmatch(job_id):
        raise CacheError(f"not a job id: {job_id!r}")
    return job_id


def object_path(objects: Path, cache_id: str) -> Path:
    """Where the complete object ``cache_id`` lives: fanned out by its first two hex digits."""
    check_cache_id(cache_id)
    return objects / cache_id[:2] / cache_id


def is_temp_name(name: str) -> bool:
    """True for an in-flight download's file name (``<cache_id>.tmp-<random>``)."""
    return TEMP_MARK in name


def make_dir(path: Path, mode: int = DIR_MODE) -> None:
    """Create ``path`` (one level) with exactly ``mode``, or check that it is a directory."""
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        if not stat.S_ISDIR(path.lstat().st_mode):
            raise CacheError(f"{path} exists and is not a directory") from None
        return
    # mkdir's mode is filtered by the umask; job users must be able to traverse regardless.
    path.chmod(mode)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries, so a rename in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_cache(root: Path, timeout: float, poll: float = 0.2) -> int:
    """Take the cache's exclusive lock for the rest of this process; return its fd.

    One agent per cache: when the daemon reconnects, the new agent waits here for the old one
    to finish its last group commit and exit, so its reconcile never deletes files the other
    is about to index, and no object is fetched by two agents. The kernel drops the lock when
    its holder dies, even by ``kill -9``. Raises CacheError after ``timeout`` seconds.
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise CacheError(
                    f"another agent ({_lock_holder(path)}) still holds {path} after"
                    f" {timeout:.0f} s: is an old `hpcstage agent --cache-dir {root}` still"
                    " running?"
                ) from None
            if not waited:
                log.info("waiting for the previous agent of %s to exit", root)
                waited = True
            time.sleep(poll)
            continue
        # Who holds it, since when: for the message above, and for people.
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode(), 0)
        return fd


def _lock_holder(path: Path) -> str:
    try:
        return f"pid {json.loads(path.read_text())['pid']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"

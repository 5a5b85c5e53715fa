"""The recycle bin: objects that stage-out replaced, kept for a retention period.

Layout, in the bucket of the replaced object: ``<trash_prefix><YYYY-MM-DD>/<job>~<ETag>/<key>``,
where the date is the job's end (UTC) and the ETag that of the version kept (entries of
older releases have no ``~<ETag>``). Listing, restoring and expiring are metadata operations
(server-side copies and deletes), so the daemon does them itself.

The API lists the bin in pages (``list_page``): one request examines at most ``PAGE`` keys
and answers with a continuation token naming the bucket and the last key examined, so that a
bin of 10^6 entries is never listed, nor checked against the database, in one request.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from hpcstage.core.identity import ObjectRef
from hpcstage.core.stageout import VERSION_MARK, same_object, trash_key
from hpcstage.errors import HpcstageError
from hpcstage.store import recycle
from hpcstage.store.protocol import Described, Precondition
from hpcstage.store.s3 import S3Store

DAY = 86400.0
PAGE = 1000  # keys one listing request examines at most (one ListObjectsV2 page)


@dataclass(frozen=True)
class TrashEntry:
    """One object in the recycle bin."""

    bucket: str
    trash_key: str
    key: str  # where it used to be
    job: str
    day: str
    size: int
    etag: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BinJob:
    """A job that held the Slurm id of a recycle-bin entry (ids are given again)."""

    user: str
    account: str
    ended_at: float | None


def owner_of(day: str, jobs: Sequence[BinJob]) -> BinJob | None:
    """Whose entry of ``day`` it is, among the jobs that held its id: the one that ended that
    day (an entry is filed under the day its job ended); else, if no job ended that day and
    they were all one user's, that user's latest; else nobody's (an id given to two users'
    jobs ending the same day: admins decide)."""
    that_day = [j for j in jobs if j.ended_at is not None and _day(j.ended_at) == day]
    if that_day:
        return that_day[-1] if len({j.user for j in that_day}) == 1 else None
    return jobs[-1] if jobs and len({j.user for j in jobs}) == 1 else None


def _day(when: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(when))


def parse_trash_key(prefix: str, trash: str) -> tuple[str, str, str]:
    """(day, job, original key) of a key in the recycle bin; HpcstageError if it is not one."""
    if not trash.startswith(prefix):
        raise HpcstageError(f"{trash!r} is not in the recycle bin ({prefix})")
    parts = trash[len(prefix) :].split("/", 2)
    if len(parts) != 3 or not all(parts) or len(parts[0]) != 10:
        raise HpcstageError(f"{trash!r} is not a recycle-bin key (<day>/<job>~<version>/<key>)")
    return parts[0], parts[1].partition(VERSION_MARK)[0], parts[2]


def expired(day: str, now: float, retention: float) -> bool:
    """True when a day folder (YYYY-MM-DD, UTC) is older than the retention period."""
    try:
        start = time.mktime(time.strptime(day, "%Y-%m-%d")) - time.timezone
    except ValueError:
        return False  # not ours: never delete what we cannot date
    return start + DAY + retention < now


class Listing(Protocol):
    """What a page needs of a store: its bucket, and a listing that starts after a key."""

    @property
    def bucket(self) -> str: ...

    def list(self, prefix: str, *, start_after: str = "") -> AsyncIterator[ObjectRef]: ...


Lease = Callable[[str], AbstractAsyncContextManager[Listing]]


@dataclass(frozen=True)
class Page:
    """Entries of one listing request, and the token of the next ('' after the last)."""

    entries: list[TrashEntry]
    next: str


def encode_token(bucket: str, after: str) -> str:
    """A continuation token: list ``bucket`` from the key after ``after`` on."""
    return base64.urlsafe_b64encode(json.dumps([bucket, after]).encode()).decode().rstrip("=")


def decode_token(token: str) -> tuple[str, str]:
    """(bucket, key) of a token from ``encode_token``; HpcstageError for anything else."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw.decode())
    except (binascii.Error, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise HpcstageError("not a continuation token of the recycle-bin listing") from exc
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise HpcstageError("not a continuation token of the recycle-bin listing")
    return value[0], value[1]


async def list_page(
    buckets: Sequence[str],
    lease: Lease,
    prefix: str,
    token: str,
    limit: int = PAGE,
    under: str = "",
) -> Page:
    """Entries of ``buckets`` (in order) from where ``token`` left off ('' = the start),
    examining at most ``limit`` keys; only those whose original key starts with ``under``."""
    names, after = list(buckets), ""
    if token:
        start, after = decode_token(token)
        if start not in names:
            raise HpcstageError(f"the continuation token is for another bucket ({start!r})")
        names = names[names.index(start) :]
    entries: list[TrashEntry] = []
    for name in names:
        async with lease(name) as store:
            found, examined, last = await _scan(store, prefix, after, limit, under)
        entries += found
        limit -= examined
        if limit <= 0:
            return Page(entries, encode_token(name, last))
        after = ""
    return Page(entries, "")


async def _scan(
    store: Listing, prefix: str, after: str, limit: int, under: str
) -> tuple[list[TrashEntry], int, str]:
    """(entries, keys examined, last key examined) of at most ``limit`` keys after ``after``."""
    found: list[TrashEntry] = []
    examined, last = 0, after
    async for ref in store.list(prefix, start_after=after):
        if ref.key <= after:
            continue  # a store that ignores StartAfter: slower, but no key twice
        examined, last = examined + 1, ref.key
        entry = _entry(store.bucket, prefix, ref)
        # The bin is filed by day and job, not by key: a key prefix filters, it cannot list.
        if entry is not None and entry.key.startswith(under):
            found.append(entry)
        if examined >= limit:
            break
    return found, examined, last


def _entry(bucket: str, prefix: str, ref: ObjectRef) -> TrashEntry | None:
    try:
        day, job, key = parse_trash_key(prefix, ref.key)
    except HpcstageError:
        return None  # not ours
    return TrashEntry(bucket, ref.key, key, job, day, ref.size, ref.etag)


async def restore(
    store: S3Store, prefix: str, trash: str, now: float | None = None
) -> dict[str, str]:
    """Bring a trash entry back to its key; whatever is there now goes to the trash first.

    The displaced version is kept under the entry's job and its own ETag (dated ``now``), so
    two restores to one key never share a name unless they displace the same bytes; it is
    written over only while the key still holds it (hpcstage.store.recycle).
    """
    _day, job, key = parse_trash_key(prefix, trash)
    kept = await store.describe(trash)
    if kept is None:
        raise HpcstageError(f"nothing in the recycle bin at s3://{store.bucket}/{trash}")
    current = await store.describe(key)
    if current is not None and _same(current, kept):
        return {"key": key, "from": trash, "displaced_to": ""}
    day = time.time() if now is None else now

    async def write(only_if: Precondition) -> ObjectRef:
        await store.copy(trash, key, only_if=only_if)
        return await store.head(key)

    placed = await recycle.replace(
        store,
        key,
        current,
        lambda version: trash_key(prefix, day, job, key, version.etag),
        write,
        lambda now_there: _same(now_there, kept),
    )
    back = placed.ref
    if back.size != kept.ref.size or (kept.etag_is_md5 and back.etag != kept.ref.etag):
        raise HpcstageError(f"restored s3://{store.bucket}/{key} does not match the trash copy")
    return {"key": key, "from": trash, "displaced_to": placed.trash_key}


def _same(a: Described, b: Described) -> bool:
    return same_object(
        a.ref.etag,
        a.ref.size,
        b.ref.etag.lower(),
        b.ref.size,
        etag_is_md5=a.etag_is_md5 and b.etag_is_md5,
        stored_sha256=a.sha256,
        sha256_hex=b.sha256,
    )


async def expire(store: S3Store, prefix: str, retention: float, now: float) -> int:
    """Delete recycle-bin entries older than ``retention``; returns how many. Deletes as it
    lists (one page in memory, not the whole bin)."""
    deleted = 0
    async for ref in store.list(prefix):
        entry = _entry(store.bucket, prefix, ref)
        if entry is not None and expired(entry.day, now, retention):
            await store.delete(entry.trash_key)
            deleted += 1
    return deleted

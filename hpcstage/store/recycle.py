"""Writing over an object without losing it: the recycle-bin rule under retries and races.

The rule: nothing at a key is overwritten unless a copy of that exact version is in the
recycle bin first. ``replace`` keeps it whatever else writes to the key meanwhile:

1. It starts from the version V the caller saw at the key (or none).
2. If there is a V, the bin must hold V under V's own name (the caller's ``trash_for(V)``,
   e.g. stageout.trash_key, which includes V's ETag). A copy already there counts only if it
   has V's size and ETag (left by an earlier attempt); otherwise V is copied there, on
   condition that the key still holds V (x-amz-copy-source-if-match), and the copy is checked
   (size; a plain-MD5 ETag must be V's), since some servers ignore that condition.
3. The new object is written on condition that the key still holds V (If-Match) or nothing
   (If-None-Match: *); where the store ignores conditions, the key is HEADed right before the
   write instead (S3Store.upload).
4. When the condition fails (someone wrote the key meanwhile), it starts again from what is
   there now, for at most ``MAX_ROUNDS`` rounds; then TransientStoreError (the caller retries
   later). Concurrent writers to one key thus serialise on the store's conditional write, and
   each one's overwritten version is in the bin under its own name.

On a store that ignores conditional writes (rclone's server) a race of one round trip remains
between the last HEAD and the write; see docs/configuration.md (stage_out.trash_prefix).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from hpcstage.core.identity import ObjectRef
from hpcstage.errors import ObjectChangedError, ObjectMissingError, TransientStoreError
from hpcstage.store.protocol import Described, Precondition
from hpcstage.store.s3 import S3Store

log = logging.getLogger(__name__)

MAX_ROUNDS: Final = 5

Write = Callable[[Precondition], Awaitable[ObjectRef]]
"""Writes the new object at the key on the given condition; ObjectChangedError if it fails."""


@dataclass(frozen=True)
class Placed:
    """The object now at the key, and where the version it replaced is kept ("": none)."""

    ref: ObjectRef
    trash_key: str


def holds(copy: ObjectRef | None, version: ObjectRef) -> bool:
    """True when ``copy`` (a HEAD of a recycle-bin key) is a copy of exactly ``version``."""
    return copy is not None and copy.size == version.size and copy.etag == version.etag


async def replace(
    store: S3Store,
    key: str,
    seen: Described | None,
    trash_for: Callable[[ObjectRef], str],
    write: Write,
    arrived: Callable[[Described], bool] = lambda _: False,
) -> Placed:
    """Write over ``key`` (which held ``seen``) with ``write``, keeping every version it
    replaces in the recycle bin at ``trash_for(version)``. See the module docstring.

    ``arrived`` tells the object being written from another: a write whose answer was lost
    (and whose retry then failed its condition) has put it there already, and it must not
    go to the bin as if someone else's.
    """
    current, kept = seen, ""
    for _ in range(MAX_ROUNDS):
        try:
            if current is not None:
                kept = await keep(store, current, trash_for(current.ref))
            return Placed(await write(Precondition(current.ref.etag if current else "")), kept)
        except ObjectChangedError as exc:
            log.info("%s changed while being replaced (%s): looking again", store.url(key), exc)
            current = await store.describe(key)
            if current is not None and arrived(current):
                return Placed(current.ref, kept)
    raise TransientStoreError(
        f"{store.url(key)}: another writer changed it {MAX_ROUNDS} times while it was being"
        " replaced; trying again later"
    )


async def keep(store: S3Store, version: Described, trash: str) -> str:
    """Make sure the recycle bin holds ``version`` at ``trash``; return ``trash``.

    ObjectChangedError when the key no longer holds ``version`` (then ``trash`` may hold
    another version: it is never deleted, and its own version gets a copy of its own).
    """
    ref = version.ref
    if holds(await store.head_or_none(trash), ref):
        return trash  # an earlier attempt copied this very version
    try:
        await store.copy(ref.key, trash, if_match=ref.etag)
    except ObjectMissingError as exc:  # deleted since it was seen: that is a change too
        raise ObjectChangedError(f"copy {store.url(ref.key)}: the object is gone") from exc
    copied = await store.describe(trash)
    if copied is None or copied.ref.size != ref.size or _md5s_differ(copied, version):
        raise ObjectChangedError(
            f"copy {store.url(ref.key)}: the copy in the recycle bin is not the version"
            " seen (the store ignored the copy's condition)"
        )
    return trash


def _md5s_differ(a: Described, b: Described) -> bool:
    # Only two MD5 ETags can be compared: a copy of a multipart object gets a plain one, and
    # under SSE-KMS or SSE-C neither is an MD5.
    return a.etag_is_md5 and b.etag_is_md5 and a.ref.etag != b.ref.etag


class UploadJournal:
    """The multipart uploads one job's stage-out opened in one bucket and has not ended.

    One small file per upload in ``directory`` (the service account's own, 0700): written
    when the upload is created, removed when it is completed or aborted. A stage-out that
    runs again after a crash aborts what its journal lists, and nothing else: another job's
    upload to the same key is not ours to abort. (Uploads of a node that never comes back
    are for the bucket's lifecycle rule, AbortIncompleteMultipartUpload.)
    """

    def __init__(self, directory: Path, bucket: str) -> None:
        self._dir = directory
        self._bucket = bucket

    def _path(self, upload_id: str) -> Path:
        name = hashlib.sha256(f"{self._bucket}\0{upload_id}".encode()).hexdigest()[:32]
        return self._dir / f"{name}.json"

    def opened(self, key: str, upload_id: str) -> None:
        """Record an upload before its first part is sent."""
        for directory in (self._dir.parent, self._dir):  # keys are nobody else's business
            directory.mkdir(mode=0o700, exist_ok=True)
        entry = {"bucket": self._bucket, "key": key, "upload_id": upload_id}
        self._path(upload_id).write_text(json.dumps(entry))

    def closed(self, upload_id: str) -> None:
        """Forget an upload that was completed or aborted."""
        self._path(upload_id).unlink(missing_ok=True)

    def pending(self) -> list[tuple[str, str]]:
        """(key, upload id) of every upload of this bucket still recorded."""
        found = []
        for path in sorted(self._dir.glob("*.json")) if self._dir.is_dir() else []:
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # cut short by a crash before the upload was created: nothing to abort
            if entry.get("bucket") == self._bucket:
                found.append((str(entry["key"]), str(entry["upload_id"])))
        return found

    def tidy(self) -> None:
        """Remove the journal's directory once nothing is recorded in it."""
        with contextlib.suppress(OSError):  # not empty (another bucket's), or already gone
            os.rmdir(self._dir)


async def abort_own(store: S3Store, journal: UploadJournal) -> int:
    """Abort the uploads ``journal`` lists (an earlier attempt's, cut short); return how many
    (one that could not be aborted stays listed for the next attempt)."""
    pending = journal.pending()
    aborted = 0
    for key, upload_id in pending:
        if await store.abort(key, upload_id):
            journal.closed(upload_id)
            aborted += 1
    return aborted

"""The object-store contract every store implements (S3: hpcstage.store.s3; a shared
filesystem: hpcstage.store.fs) and the values that cross it.

The contract (:class:`ObjectStore`)
    ``list`` streams the objects under a key prefix page by page (S3 string-prefix semantics:
    ``"a/"`` never lists ``"ab/x"``); ``head`` describes one object; ``download`` writes an object
    into an open file descriptor at offsets and says how its bytes were checked (and, for small
    objects, their SHA-256); ``upload``, ``copy``, ``delete`` and ``close`` do what they say.
    ``delete`` of a missing key is not an error.

Errors
    Every failure on the store's side is a :class:`~hpcstage.errors.StoreError` (see errors.py),
    translated from the vendor exception at this boundary with ``raise ... from``. Each request is
    retried inside the store by the one policy of :mod:`hpcstage.retry`, so a
    ``TransientStoreError`` escaping a store has already been retried: callers may reschedule the
    object later but must not wrap the call in another retry loop. ``OSError`` on the caller's
    side (writing ``dest_fd``, reading an upload's source file) is the caller's disk, not the
    store, and propagates unchanged.

Verification
    A download checks its byte count against ``ObjectRef.size``, that the object still has the
    listed ETag, and the content of the bytes against the best checksum the store has: for an
    object above ``LEAN_MAX``, a full-object checksum the store keeps (CRC64NVME, CRC32C, ...;
    asked for with one HEAD, see hpcstage.store.checksums); else, when the ETag is a plain MD5
    (single-part uploads), the MD5 of the bytes. A multipart ETag without a store checksum
    allows no content check, nor does the ETag of an object encrypted with SSE-KMS or SSE-C,
    which looks like an MD5 and is none (known by the answer's encryption headers, see
    ``hpcstage.store.verify.etag_is_md5``). Objects up to ``LEAN_MAX`` also get a SHA-256,
    which the node cache records and peer copy verifies; bigger ones do not (it would cost a
    second pass over every byte for a record nothing reads). Uploads send Content-MD5 for
    every request, so the server rejects corrupted bodies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from hpcstage.core.identity import ObjectRef

Progress = Callable[[int], None]
"""Called with the number of bytes newly transferred (never negative, each byte counted once)."""

MIB: Final = 2**20
GIB: Final = 2**30
LEAN_MAX: Final = 1 * MIB  # objects up to this size get a SHA-256 (and try the lean GET first)


@dataclass(frozen=True)
class DownloadResult:
    """What a download wrote: the byte count and how the content was checked.

    ``sha256_hex`` is the SHA-256 of the bytes for objects up to ``LEAN_MAX``, "" for bigger
    ones. ``verified`` names what the bytes were checked against beyond their count and the
    ETag: a store checksum's algorithm (``"crc64nvme"``, ``"crc32c"``, ``"crc32"``, ``"sha1"``,
    ``"sha256"``), ``"md5"`` (a plain-MD5 ETag), or "" when the store offers nothing to check
    content against (a multipart ETag and no store checksum; a shared-filesystem file).
    """

    sha256_hex: str
    size: int
    verified: str


@dataclass(frozen=True)
class Precondition:
    """What must be at a key for a write to go ahead: the object whose ETag is ``etag``, or
    (``etag == ""``) no object at all. See ``S3Store.upload``."""

    etag: str = ""

    def holds(self, current: ObjectRef | None) -> bool:
        """True when ``current`` (a fresh HEAD, None: no object) is what the write expects."""
        if not self.etag:
            return current is None
        return current is not None and current.etag == self.etag

    def headers(self) -> dict[str, str]:
        """The request's conditional header: If-Match on the ETag, or If-None-Match: *."""
        return {"IfMatch": f'"{self.etag}"'} if self.etag else {"IfNoneMatch": "*"}


@dataclass(frozen=True)
class Described:
    """What a HEAD says about an object beyond its identity: enough to tell whether it holds
    the bytes of a given file without reading it back."""

    ref: ObjectRef
    sha256: str  # the SHA-256 hpcstage recorded in the object's metadata on upload ("": none)
    etag_is_md5: bool  # False for a multipart ETag, and under SSE-KMS or SSE-C


class UploadLog(Protocol):
    """Hears of every multipart upload a store opens and ends, so that the uploads of a writer
    killed mid-way can be aborted later by it alone (see hpcstage.store.recycle.UploadJournal)."""

    def opened(self, key: str, upload_id: str) -> None:
        """A multipart upload of ``key`` was created (called before any part is sent)."""
        ...

    def closed(self, upload_id: str) -> None:
        """The upload was completed or aborted."""
        ...


@dataclass(frozen=True)
class UploadOptions:
    """How an S3 upload writes beyond its bytes (see ``S3Store.upload``): only while the key
    holds what the caller saw (``only_if``), told to a journal (``journal``), with the file's
    SHA-256 recorded in the object's metadata (``sha256``, "": none)."""

    only_if: Precondition | None = None
    journal: UploadLog | None = None
    sha256: str = ""


class ObjectStore(Protocol):
    """A handful of async methods every store implements (see the module docstring)."""

    def url(self, key: str) -> str:
        """How messages name ``key``: ``s3://bucket/key``, or the path itself."""
        ...

    def list(self, prefix: str) -> AsyncIterator[ObjectRef]:
        """Stream every object whose key starts with ``prefix``, in pages, never all at once."""
        ...

    async def head(self, key: str, *, version_id: str = "") -> ObjectRef:
        """Describe one object (with ``version_id``: that version of it); StoreError naming it
        when it does not exist."""
        ...

    async def download(
        self, ref: ObjectRef, dest_fd: int, *, progress: Progress | None = None
    ) -> DownloadResult:
        """Write ``ref``'s bytes into ``dest_fd`` (opened O_RDWR: big objects are read back)."""
        ...

    async def read_range(self, ref: ObjectRef, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of ``ref`` in memory; ObjectChangedError when the
        object is no longer ``ref``. Content is the caller's to check."""
        ...

    async def upload(self, path: Path, key: str, *, progress: Progress | None = None) -> ObjectRef:
        """Store the file at ``path`` under ``key``; return the new object's identity."""
        ...

    async def upload_fd(self, fd: int, key: str, *, progress: Progress | None = None) -> ObjectRef:
        """``upload`` of the file open as ``fd`` (read with pread; the caller closes it)."""
        ...

    async def copy(self, src_key: str, dst_key: str) -> None:
        """Copy an object inside the store, without moving its bytes through this process."""
        ...

    async def delete(self, key: str) -> None:
        """Remove an object; a missing one is not an error."""
        ...

    async def close(self) -> None:
        """Release connections; the store may not be used afterwards."""
        ...


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/key`` into ``("bucket", "some/key")``; the key may be empty.

    Raises ValueError for anything else, and for keys with a ``..`` component (never staged).
    """
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r}: expected s3://bucket/key")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{url!r}: the bucket name is missing")
    if ".." in key.split("/"):
        raise ValueError(f"{url!r}: '..' is not allowed in a key")
    return bucket, key

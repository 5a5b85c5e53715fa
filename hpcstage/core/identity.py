"""Source identity of a cached object: what makes two fetches 'the same bytes'."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ObjectRef:
    """One object at its source, as listed: an S3 object or a file on a shared filesystem.

    ``store`` names the store ("s3" endpoint URL, or "file"), ``bucket`` is empty for files,
    ``key`` is the object key (or absolute path), ``etag`` the S3 ETag without quotes (for files:
    the mtime in nanoseconds), ``size`` in bytes. Objects are immutable in the cache: a changed
    object at the same key has another identity and is fetched anew.

    ``version_id`` is set only for a pinned S3 version (``s3://b/k?versionId=V``): it is part
    of the identity, so a pinned version and the key's current object are two cache entries
    even when their ETags agree. ``last_modified_ns`` (nanoseconds since the epoch, as the
    listing or HEAD gave it; None where the store gave none) is no part of the identity: it
    becomes the cached file's mtime.
    """

    store: str
    bucket: str
    key: str
    etag: str
    size: int
    version_id: str = ""
    last_modified_ns: int | None = field(default=None, compare=False)

    @property
    def cache_id(self) -> str:
        """Stable hex name of this object in every node cache."""
        parts = [self.store, self.bucket, self.key, self.etag, str(self.size)]
        if self.version_id:  # unpinned objects keep the ids they always had
            parts.append(f"versionId={self.version_id}")
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

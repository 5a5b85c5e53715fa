"""Source identity of a cached object: what makes two fetches 'the same bytes'."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectRef:
    """One object at its source, as listed: an S3 object or a file on a shared filesystem.

    ``store`` names the store ("s3" endpoint URL, or "file"), ``bucket`` is empty for files,
    ``key`` is the object key (or absolute path), ``etag`` the S3 ETag without quotes (for files:
    the mtime in nanoseconds), ``size`` in bytes. Objects are immutable in the cache: a changed
    object at the same key has another identity and is fetched anew.
    """

    store: str
    bucket: str
    key: str
    etag: str
    size: int

    @property
    def cache_id(self) -> str:
        """Stable hex name of this object in every node cache."""
        raw = "\0".join((self.store, self.bucket, self.key, self.etag, str(self.size)))
        return hashlib.sha256(raw.encode()).hexdigest()

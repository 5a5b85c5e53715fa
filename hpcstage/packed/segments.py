"""Segments: plain tar files holding a packed dataset's bytes.

``SegmentWriter`` appends members to a local spool file (header, bytes, padding), hashing as it
goes, and says where each member's bytes start; the finished file is an ordinary tar archive
(``tar tf`` lists it) and is uploaded as one object. ``checked`` takes a member's bytes out of a
fetched span and verifies them against the manifest's CRC-32.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from hpcstage.core.packed import END_OF_ARCHIVE, Span, padded, tar_header
from hpcstage.errors import PackError
from hpcstage.packed.manifest import Member

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Finished:
    """A complete segment file: its size and SHA-256."""

    path: Path
    name: str
    size: int
    sha256: str
    files: int


class SegmentWriter:
    """Builds one segment at ``path`` (created new, private until uploaded)."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self.offset = 0  # bytes written so far
        self.files = 0
        self._sha = hashlib.sha256()
        self._fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            done = os.write(self._fd, view)
            self._sha.update(view[:done])
            view = view[done:]
        self.offset += len(data)

    def add(self, path: str, data: bytes, mode: int, mtime_ns: int, etag: str = "") -> Member:
        """Append a file held in memory; its manifest row."""
        self._header(path, len(data), mode, mtime_ns)
        start = self.offset
        self._write(data)
        self._pad(len(data))
        return Member(path, len(data), mode, mtime_ns, self.name, start, zlib.crc32(data), etag)

    def add_fd(
        self, path: str, fd: int, size: int, mode: int, mtime_ns: int, etag: str = ""
    ) -> Member:
        """Append ``size`` bytes read from ``fd`` (from offset 0); PackError if it is shorter."""
        self._header(path, size, mode, mtime_ns)
        start, crc, done = self.offset, 0, 0
        while done < size:
            chunk = os.pread(fd, min(_CHUNK, size - done), done)
            if not chunk:
                raise PackError(f"{path!r} shrank while it was packed ({done} of {size} bytes)")
            crc = zlib.crc32(chunk, crc)
            self._write(chunk)
            done += len(chunk)
        self._pad(size)
        return Member(path, size, mode, mtime_ns, self.name, start, crc, etag)

    def _header(self, path: str, size: int, mode: int, mtime_ns: int) -> None:
        self._write(tar_header(path, size, mode, mtime_ns // 1_000_000_000))
        self.files += 1

    def _pad(self, size: int) -> None:
        if padded(size) != size:
            self._write(b"\0" * (padded(size) - size))

    def finish(self) -> Finished:
        """End the archive, flush it to disk and close it."""
        self._write(END_OF_ARCHIVE)
        os.fsync(self._fd)
        os.close(self._fd)
        return Finished(self.path, self.name, self.offset, self._sha.hexdigest(), self.files)

    def abort(self) -> None:
        """Close and remove the spool file."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self.path.unlink(missing_ok=True)


def member_bytes(span: Span, data: bytes | memoryview, member: Member) -> memoryview:
    """``member``'s bytes out of ``data`` (the bytes of ``span`` of its segment), checked
    against its CRC-32 (PackError: the segment is corrupt or not the one the manifest meant)."""
    start = member.offset - span.start
    if start < 0 or member.offset + member.size > span.end:
        raise PackError(f"{member.path!r} lies outside the fetched bytes of {member.segment}")
    body = memoryview(data)[start : start + member.size]
    if zlib.crc32(body) != member.crc32:
        raise PackError(
            f"{member.path!r} in segment {member.segment}: CRC-32 mismatch (corrupt segment)"
        )
    return body

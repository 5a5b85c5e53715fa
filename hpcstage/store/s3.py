"""Object stores behind one small async contract: S3 (aiobotocore) and a shared filesystem.

The contract (:class:`ObjectStore`)
    ``list`` streams the objects under a key prefix page by page (S3 string-prefix semantics:
    ``"a/"`` never lists ``"ab/x"``); ``head`` describes one object; ``download`` writes an object
    into an open file descriptor at offsets and says how its bytes were checked (and, for small
    objects, their SHA-256); ``upload``, ``copy``,
    ``delete`` and ``close`` do what they say. ``delete`` of a missing key is not an error.

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
    ``etag_is_md5``). Objects up to ``LEAN_MAX`` also get a SHA-256, which the node
    cache records and peer copy verifies; bigger ones do not (it would cost a second pass
    over every byte for a record nothing reads). Uploads send Content-MD5 for every request,
    so the server rejects corrupted bodies.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import io
import logging
import math
import os
import re
import secrets
import ssl
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Final, Protocol, Self, TypeAlias, TypeVar, cast

import aiohttp
import botocore.exceptions as bce
import botocore.session
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.parsers import ResponseParserError

from hpcstage.core.identity import ObjectRef
from hpcstage.errors import (
    CredentialError,
    ObjectChangedError,
    ObjectMissingError,
    StoreError,
    TransientStoreError,
)
from hpcstage.retry import DEFAULT_RETRY, OnRetry, RetryPolicy, with_retries
from hpcstage.store import checksums
from hpcstage.store.checksums import StoreChecksum
from hpcstage.store.lean import LeanGet
from hpcstage.store.lean_client import Endpoint, LeanStats
from hpcstage.store.libc import (
    DIRECT_ALIGN,
    DIRECT_UNSUPPORTED,
    PartSink,
    open_direct,
    preallocate,
    pwrite_all,
    start_writeback,
)
from hpcstage.store.ranged import RangeAbort, RangeGet
from hpcstage.store.sigv4 import SigV4

if TYPE_CHECKING:
    from aiobotocore.response import StreamingBody
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

T = TypeVar("T")
Item = TypeVar("Item")

Progress = Callable[[int], None]
"""Called with the number of bytes newly transferred (never negative, each byte counted once)."""

MIB: Final = 2**20
GIB: Final = 2**30
S3_MIN_PART: Final = 5 * MIB  # S3 refuses smaller parts (except the last)
S3_MAX_PARTS: Final = 10_000
S3_MAX_COPY: Final = 5 * GIB  # CopyObject's limit; larger objects are copied in parts

_STREAM_CHUNK: Final = 1 * MIB  # bytes buffered per connection before one pwrite
_FILE_CHUNK: Final = 8 * MIB  # pread/pwrite size for local and shared-filesystem copies
_PLAIN_MD5: Final = re.compile(r"[0-9a-fA-F]{32}")
LEAN_MAX: Final = 1 * MIB  # objects up to this size try the lean GET first (hpcstage.store.lean)
READ_BACK_PARTS: Final = 4  # parts of one object in flight when it is hashed in order
_INLINE_WRITE: Final = 64 * 1024  # bodies up to this size are written on the event loop
_PROXY_VARIABLES: Final = ("http_proxy", "https_proxy", "all_proxy")


@dataclass
class WriteStats:
    """How big downloads reached the disk and were checked (for tests and the benchmark)."""

    direct_bytes: int = 0  # written with O_DIRECT
    checked_inline: int = 0  # multipart downloads checksummed part by part as bytes arrived
    read_back: int = 0  # multipart downloads read back from the page cache to be checked
    direct_refused: str = ""  # why O_DIRECT was given up on this store ("": it was not)


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


S3Credentials: TypeAlias = dict[str, str]
"""Explicit S3 credentials as the daemon hands them to agents (JSON-ready):
``access_key``, ``secret_key`` and ``token`` ("" for long-term keys)."""

_ADDRESSING_STYLES: Final = ("path", "virtual", "auto")


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


SHA256_METADATA: Final = "hpcstage-sha256"  # x-amz-meta-hpcstage-sha256, set on upload
_OPAQUE_SSE: Final = frozenset({"aws:kms", "aws:kms:dsse"})  # their ETags are no MD5 (nor SSE-C's)


@dataclass(frozen=True)
class Described:
    """What a HEAD says about an object beyond its identity: enough to tell whether it holds
    the bytes of a given file without reading it back."""

    ref: ObjectRef
    sha256: str  # the SHA-256 hpcstage recorded in the object's metadata on upload ("": none)
    etag_is_md5: bool  # False for a multipart ETag, and under SSE-KMS or SSE-C


def etag_is_md5(etag: str, answer: Mapping[str, Any]) -> bool:
    """True when ``etag`` in a HEAD/PUT ``answer`` is the MD5 of the bytes: a plain 32-hex ETag
    of an object not encrypted with SSE-KMS or SSE-C (those look like MD5s but are not)."""
    if answer.get("ServerSideEncryption") in _OPAQUE_SSE or answer.get("SSECustomerAlgorithm"):
        return False
    return bool(_PLAIN_MD5.fullmatch(etag))


_NO_ETAG: Final = Precondition("0" * 32)  # an ETag no object has: If-Match must fail


class UploadLog(Protocol):
    """Hears of every multipart upload a store opens and ends, so that the uploads of a writer
    killed mid-way can be aborted later by it alone (see hpcstage.store.recycle.UploadJournal)."""

    def opened(self, key: str, upload_id: str) -> None:
        """A multipart upload of ``key`` was created (called before any part is sent)."""
        ...

    def closed(self, upload_id: str) -> None:
        """The upload was completed or aborted."""
        ...


class ObjectStore(Protocol):
    """A handful of async methods every store implements (see the module docstring)."""

    def url(self, key: str) -> str:
        """How messages name ``key``: ``s3://bucket/key``, or the path itself."""
        ...

    def list(self, prefix: str) -> AsyncIterator[ObjectRef]:
        """Stream every object whose key starts with ``prefix``, in pages, never all at once."""
        ...

    async def head(self, key: str) -> ObjectRef:
        """Describe one object; StoreError naming it when it does not exist."""
        ...

    async def download(
        self, ref: ObjectRef, dest_fd: int, *, progress: Progress | None = None
    ) -> DownloadResult:
        """Write ``ref``'s bytes into ``dest_fd`` (opened O_RDWR: big objects are read back)."""
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


def resolve_credentials(profile: str | None = None) -> S3Credentials:
    """Ask botocore's credential chain once (env, shared files, ``profile``, instance roles)."""
    return CredentialSource(profile).current()


class CredentialSource:
    """The site's S3 credentials, kept fresh for as long as the daemon runs.

    botocore's chain is asked once; what it finds for temporary credentials (STS, SSO, web
    identity, an instance role, a ``credential_process``) refreshes itself when asked within
    15 minutes of its expiry, so ``current()`` called every tick returns new keys before the
    old ones lapse, and the daemon hands them on. Long-term keys never change. Blocking (a
    refresh may ask a metadata service or run a process): call it in a thread.
    """

    def __init__(self, profile: str | None = None) -> None:
        self.profile = profile
        self._session = botocore.session.Session(profile=profile)
        self._found: Any = None

    def current(self) -> S3Credentials:
        """The credentials to sign with now; CredentialError when there are none."""
        try:
            if self._found is None:
                self._found = self._session.get_credentials()
            frozen = self._found.get_frozen_credentials() if self._found is not None else None
        except (bce.BotoCoreError, RuntimeError) as exc:
            # botocore's credential-chain messages name providers and variables, never values
            # (RuntimeError: refreshed credentials that are expired already).
            raise CredentialError(f"S3 credentials: {exc}") from exc
        if frozen is None or not frozen.access_key or not frozen.secret_key:
            where = f"profile {self.profile!r}" if self.profile else "the environment or ~/.aws"
            raise CredentialError(f"S3 credentials: none found in {where}")
        token = frozen.token or ""
        return {"access_key": frozen.access_key, "secret_key": frozen.secret_key, "token": token}

    def region(self, configured: str) -> str:
        """``configured`` if set, else AWS_REGION / AWS_DEFAULT_REGION / the profile's region,
        else us-east-1 (what S3-compatible servers expect when they care at all)."""
        if configured or os.environ.get("AWS_REGION"):
            return configured or os.environ["AWS_REGION"]
        try:
            found = self._session.get_config_variable("region")  # AWS_DEFAULT_REGION, profile
        except bce.BotoCoreError:
            found = None
        return str(found or "us-east-1")


# --------------------------------------------------------------------------------------------
# Shared helpers: progress, bounded concurrency, memory budget, hashing
# --------------------------------------------------------------------------------------------


class _PartProgress:
    """Turns 'part N has D bytes done' into deltas, so a retried part is never counted twice.

    ``landed`` (optional) hears every report as it is (the part's attempt has written its
    first D bytes), and ``restart`` that a part is fetched again from its first byte."""

    def __init__(
        self,
        callback: Progress | None,
        landed: Callable[[int, int], None] | None = None,
        restart: Callable[[int], None] | None = None,
    ) -> None:
        self._callback = callback
        self._landed = landed
        self._restart = restart
        self._done: dict[int, int] = {}

    def update(self, part: int, done: int) -> None:
        if self._landed is not None:
            self._landed(part, done)
        previous = self._done.get(part, 0)
        if done > previous:
            self._done[part] = done
            if self._callback is not None:
                self._callback(done - previous)

    def restart(self, part: int) -> None:
        if self._restart is not None:
            self._restart(part)


class _MemoryBudget:
    """Caps the upload bytes held in memory at once; one request larger than the cap runs alone.

    An object below the multipart threshold is read into memory to send it with its
    Content-MD5, so without this 64 transfers of 256 MiB objects would hold 16 GiB. (Parts of
    bigger objects are streamed from the file: they hold no more than a read each.)
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._freed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def reserve(self, size: int) -> AsyncIterator[None]:
        while self._used and self._used + size > self._limit:
            self._freed.clear()
            await self._freed.wait()
        self._used += size
        try:
            yield
        finally:
            # Synchronous on purpose: a cancelled task still gives its bytes back.
            self._used -= size
            self._freed.set()


async def _run_bounded(
    items: Iterable[Item], fn: Callable[[Item], Awaitable[None]], limit: int
) -> None:
    """Run ``fn`` on every item, at most ``limit`` at a time (a worker pool, not one task each).

    The first failure cancels the others and is raised as itself, not as an ExceptionGroup.
    """
    shared = iter(items)

    async def worker() -> None:
        for item in shared:  # one iterator shared by all workers: each item is taken once
            await fn(item)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, limit)):
                group.create_task(worker())
    except BaseExceptionGroup as failures:
        first = failures.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from first.__cause__  # keep the vendor error as the cause


@dataclass(frozen=True)
class _Part:
    number: int  # 1-based, as S3 numbers parts
    offset: int
    length: int


def _parts(size: int, part_size: int) -> Sequence[_Part]:
    """Split ``size`` bytes into ``part_size`` parts, grown if needed to fit S3's 10,000 parts."""
    part_size = max(part_size, math.ceil(size / S3_MAX_PARTS))
    count = max(1, math.ceil(size / part_size))
    return [_Part(n + 1, n * part_size, min(part_size, size - n * part_size)) for n in range(count)]


def _new_md5() -> Any:
    # MD5 only checks S3's ETag, it protects nothing, hence usedforsecurity=False (FIPS hosts).
    return hashlib.md5(usedforsecurity=False)


@dataclass
class _Checks:
    """The running checksums of one download, chosen by what the store can confirm."""

    ref: ObjectRef
    stored: StoreChecksum | None  # the store's full-object checksum, if it keeps one
    store: checksums.Checksummer | None  # computing it over the bytes
    md5: Any | None  # when the ETag is a plain MD5 and the store keeps no checksum
    sha256: Any | None  # recorded for objects up to LEAN_MAX
    parts: checksums.PartChecksums | None = None  # the store's checksum, part by part

    @classmethod
    def choose(cls, ref: ObjectRef, stored: StoreChecksum | None, md5_etag: bool = True) -> _Checks:
        """``md5_etag`` False: the object's ETag is no MD5 although it may look like one
        (SSE-KMS, SSE-C: see ``etag_is_md5``)."""
        md5 = stored is None and md5_etag and _PLAIN_MD5.fullmatch(ref.etag)
        return cls(
            ref,
            stored,
            store=stored.new() if stored is not None else None,
            md5=_new_md5() if md5 else None,
            sha256=hashlib.sha256() if ref.size <= LEAN_MAX else None,
        )

    def hashers(self) -> list[Any]:
        return [h for h in (self.md5, self.store, self.sha256) if h is not None]

    def by_parts(self, parts: Sequence[_Part]) -> bool:
        """Check a multipart download part by part as its bytes arrive, in any order (True),
        if what must be computed allows it: nothing, or a CRC the store keeps. An MD5 (of a
        single-PUT ETag) or a SHA must see the bytes in order: the parts are read back."""
        if self.md5 is not None or self.sha256 is not None:
            return False
        if self.stored is not None:
            if not checksums.combinable(self.stored.algorithm):
                return False
            self.parts = checksums.PartChecksums(self.stored.algorithm, [p.length for p in parts])
        return True

    def part(self, part: _Part) -> checksums.Checksummer | None:
        """A fresh checksum of ``part``'s bytes (None: none to compute), for each attempt."""
        return self.parts.part(part.number - 1) if self.parts is not None else None

    def verify(self, url: str) -> DownloadResult:
        """Compare with what the store said; TransientStoreError on a mismatch."""
        ref, stored, verified = self.ref, self.stored, ""
        if self.store is not None and stored is not None:
            got = self.parts.value() if self.parts is not None else self.store.value()
            if got != stored.value:
                raise TransientStoreError(
                    f"{url}: checksum mismatch (the store keeps {stored},"
                    f" the bytes have {stored.algorithm.upper()} {got})"
                )
            verified = stored.algorithm
        elif self.md5 is not None:
            _check_md5(url, ref.etag, self.md5.hexdigest())
            verified = "md5"
        sha256 = self.sha256.hexdigest() if self.sha256 is not None else ""
        return DownloadResult(sha256, ref.size, verified)


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int, hashers: Iterable[Any]) -> None:
    """Write all of ``data`` at ``offset`` and hash it."""
    pwrite_all(fd, data, offset)
    for hasher in hashers:
        hasher.update(data)


class _InOrderHash:
    """Checksums of a file whose parts land out of order (``hashers``: objects with update()).

    The bytes are hashed in file order, read back from the page cache in threads, as soon as
    they are written: the part being hashed is followed as its bytes land (each part is
    written front to back by one attempt), so hashing overlaps the download instead of
    following it. What is hashed also starts on its way to disk (the lean ranged GET already
    started most of it as it wrote; the SDK's fallback path did not).

    A part fetched again after some of its bytes were hashed (the SDK's retry of a failed
    ranged GET) would be checked by bytes since overwritten: ``finish`` then raises
    TransientStoreError, and the object is fetched again whole.
    """

    def __init__(self, fd: int, parts: Sequence[_Part], hashers: Sequence[Any]) -> None:
        self._fd = fd
        self._parts = parts
        self._hashers = hashers
        self._landed: dict[int, int] = {}  # part number -> bytes its attempt has written
        self._current = 0  # the part being hashed (0: none yet)
        self._hashed = 0  # its bytes hashed so far
        self._reading = False  # its bytes are being read (hashed) since it became current
        self._refetched = 0  # a part fetched again after being (partly) hashed
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def landed(self, number: int, done: int) -> None:
        """Part ``number``'s current attempt has written its first ``done`` bytes."""
        if not self._hashers and done < self._parts[number - 1].length:
            return  # only writeback to start: by whole parts
        self._landed[number] = done
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="hash-in-order")

    def part_done(self, part: _Part) -> None:
        """``part`` is completely written."""
        self.landed(part.number, part.length)

    def restart(self, number: int) -> None:
        """Part ``number`` is fetched again from its first byte."""
        self._landed.pop(number, None)
        if number < self._current or (number == self._current and self._reading):
            self._refetched = self._refetched or number

    async def _run(self) -> None:
        for part in self._parts:
            self._current, self._hashed, self._reading = part.number, 0, False
            while self._hashed < part.length:
                upto = self._landed.get(part.number, 0)
                if upto <= self._hashed:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                start, length = part.offset + self._hashed, upto - self._hashed
                self._reading = True
                # One thread per checksum (hashlib and awscrt release the GIL), each reading
                # the page cache itself.
                await asyncio.gather(
                    *(asyncio.to_thread(self._hash, h, start, length) for h in self._hashers),
                    asyncio.to_thread(start_writeback, self._fd, start, length),
                )
                self._hashed = upto

    def _hash(self, hasher: Any, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            chunk = os.pread(self._fd, min(_FILE_CHUNK, end - offset), offset)
            if not chunk:
                raise OSError(errno.EIO, "file shorter than what was written to it")
            hasher.update(chunk)
            offset += len(chunk)

    async def finish(self, url: str) -> None:
        """Return once every part has landed and been hashed (``url`` names the object)."""
        if self._task is None:  # no parts (cannot happen for multipart sizes): hash nothing
            self._task = asyncio.create_task(self._run())
        await self._task
        if self._refetched and self._hashers:
            raise TransientStoreError(
                f"{url}: part {self._refetched} was fetched again after its first bytes were"
                " checked; fetching the object again"
            )

    async def cancel(self) -> None:
        """Stop hashing (after a failed download); no-op once finished."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _read_with_md5(fd: int, offset: int, length: int) -> tuple[bytes, bytes]:
    """Read ``length`` bytes at ``offset`` and their MD5 digest (for Content-MD5)."""
    chunks: list[bytes] = []
    done = 0
    while done < length:
        chunk = os.pread(fd, min(_FILE_CHUNK, length - done), offset + done)
        if not chunk:
            raise OSError(errno.EIO, f"file shrank while uploading it (short by {length - done})")
        chunks.append(chunk)
        done += len(chunk)
    data = b"".join(chunks)
    return data, hashlib.md5(data, usedforsecurity=False).digest()


def _md5_of_range(fd: int, offset: int, length: int) -> bytes:
    """The MD5 digest of ``length`` bytes at ``offset`` (for a streamed part's Content-MD5)."""
    md5, done = _new_md5(), 0
    while done < length:  # 1 MiB reads: parts hash in parallel, each holding one read
        chunk = os.pread(fd, min(MIB, length - done), offset + done)
        if not chunk:
            raise OSError(errno.EIO, f"file shrank while uploading it (short by {length - done})")
        md5.update(chunk)
        done += len(chunk)
    return bytes(md5.digest())


class _FileRange(io.RawIOBase):
    """``length`` bytes of the file open as ``fd`` from ``offset``, as a seekable stream:
    what an upload sends (and sends again on a retry) is read from the file as it goes, with
    pread (no shared offset: parts of one fd stream in parallel). Closing it leaves ``fd``."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd, self._offset, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._length - self._pos)
        if want <= 0:
            return 0
        got = os.preadv(self._fd, [memoryview(buffer)[:want]], self._offset + self._pos)
        if not got:
            raise OSError(errno.EIO, "file shrank while uploading it")
        self._pos += got
        return got


def _md5_contradicts(etag: str, md5_hex: str) -> bool:
    """True if ``etag`` is a plain MD5 (no '-': not multipart) other than ``md5_hex``."""
    return bool(_PLAIN_MD5.fullmatch(etag)) and etag.lower() != md5_hex


def _check_md5(url: str, etag: str, md5_hex: str) -> None:
    """A plain-MD5 ETag (no '-': not multipart) must equal the MD5 of the bytes."""
    if _md5_contradicts(etag, md5_hex):
        raise TransientStoreError(f"{url}: checksum mismatch (ETag {etag}, bytes have {md5_hex})")


# --------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------

_CREDENTIAL_CODES: Final = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
        "401",
        "403",
    }
)
_CONDITION_CODES: Final = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_MISSING_CODES: Final = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound", "404"})
_TRANSIENT_CODES: Final = frozenset(
    {
        "BadDigest",  # the body was corrupted on the way: send it again
        "IncompleteBody",
        "InternalError",
        "OperationAborted",
        "RequestLimitExceeded",
        "RequestTimeout",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
    }
)
_TRANSIENT_VENDOR: Final = (
    bce.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ...
    bce.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    bce.IncompleteReadError,
    aiohttp.ClientError,
    ConnectionError,
    TimeoutError,
)
_CREDENTIAL_VENDOR: Final = (
    bce.NoCredentialsError,
    bce.PartialCredentialsError,
    bce.CredentialRetrievalError,
    bce.ProfileNotFound,
    bce.TokenRetrievalError,
    bce.SSOError,
)
# Everything a request can raise that this module translates.
_VENDOR_ERRORS: Final = (
    bce.BotoCoreError,
    bce.ClientError,
    aiohttp.ClientError,
    ConnectionError,
    TimeoutError,
)
# What botocore's parsers and handlers raise, untranslated, on a response that is well-formed
# XML of the wrong shape: <Size>lots</Size> (ValueError from int()), a <Contents> without <Key>
# (KeyError from the url-decoding handler). Caught around client calls only, never our code.
_MALFORMED: Final = (ValueError, KeyError, TypeError, AttributeError, IndexError)
# A body that ended before its Content-Length (aiohttp) or that botocore found short.
_TRUNCATED_VENDOR: Final = (aiohttp.ClientPayloadError, bce.IncompleteReadError)
_SHOWN_MAX: Final = 300  # characters of a key or server text quoted in a message
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(text: str) -> str:
    """``text`` safe to print in one line of a message: control characters escaped, bounded.

    Keys may hold any character; a message must not carry a newline or a terminal escape
    sequence from a hostile store (or user) to a log or a terminal.
    """
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."


def malformed_response(exc: BaseException, where: str) -> StoreError:
    """The error for a response botocore could not make sense of (see ``_MALFORMED``)."""
    detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
    return StoreError(f"{where}: the store sent a malformed response ({shown(detail)})")


def _translate_client_error(exc: bce.ClientError, where: str) -> StoreError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    if code in _CREDENTIAL_CODES or status in (401, 403):
        # The server's text is left out: some error bodies echo the request's signing details.
        return CredentialError(f"{where}: access denied ({code or status}); check the credentials")
    if code in _CONDITION_CODES or status == 412:
        # A conditional request (If-Match, If-None-Match, x-amz-copy-source-if-match) lost a
        # race: the object is not what the caller saw. Not retried as is: look again first.
        return ObjectChangedError(f"{where}: the object changed (precondition failed)")
    if code in _MISSING_CODES or status == 404:
        what = "bucket" if code == "NoSuchBucket" else "object"
        return ObjectMissingError(f"{where}: no such {what}")
    if code == str(status) and status >= 500:
        # No S3 error in the body: a proxy's page, or (botocore turns these into a 500) a 200
        # whose XML did not parse, e.g. a listing cut off on the way.
        message = f"{where}: HTTP {status} without an S3 answer (malformed or cut-off response)"
    else:
        message = f"{where}: {code or status} {shown(str(error.get('Message', '')))}".rstrip()
    if code in _TRANSIENT_CODES or status >= 500 or status == 429:
        return TransientStoreError(message)
    return StoreError(message)


def translate_s3_error(exc: BaseException, where: str) -> StoreError:
    """Map a botocore/aiohttp exception to the hpcstage tree; ``where`` is "OP s3://bucket/key".

    Callers raise the result ``from exc``; the message never holds credentials.
    """
    if isinstance(exc, bce.ClientError):
        return _translate_client_error(exc, where)
    if isinstance(exc, bce.SSLError | aiohttp.ClientSSLError):
        # A certificate problem does not heal by waiting: say so at once.
        return StoreError(f"{where}: TLS error ({exc}); check store.verify_tls/ca_bundle")
    if isinstance(exc, _CREDENTIAL_VENDOR):
        return CredentialError(f"{where}: {exc}")
    if isinstance(exc, _TRUNCATED_VENDOR):
        return TransientStoreError(
            f"{where}: truncated: the connection ended before the whole body arrived"
        )
    if isinstance(exc, bce.ReadTimeoutError):
        return TransientStoreError(f"{where}: the store stopped answering (read timeout)")
    if isinstance(exc, _TRANSIENT_VENDOR):
        return TransientStoreError(f"{where}: {type(exc).__name__}: {exc}")
    if isinstance(exc, ResponseParserError):
        return StoreError(f"{where}: the store sent a malformed response")
    return StoreError(f"{where}: {type(exc).__name__}: {exc}")


async def _write_body(fd: int, body: bytes) -> None:
    if len(body) <= _INLINE_WRITE:
        _pwrite_all(fd, body, 0, ())  # a few KiB into the page cache: no thread hop
    else:
        await asyncio.to_thread(_pwrite_all, fd, body, 0, ())


async def download_bytes(store: ObjectStore, ref: ObjectRef) -> tuple[bytes, str]:
    """A small object's bytes and their SHA-256, verified as ``download`` verifies.

    S3 objects come through the lean GET when it applies; otherwise the store's ``download``
    writes into an anonymous memory file (memfd), never into the cache directory.
    """
    if isinstance(store, S3Store):
        lean = await store.lean_bytes(ref)
        if lean is not None:
            return lean[0], lean[1]
    fd = os.memfd_create("hpcstage-object", os.MFD_CLOEXEC)
    try:
        result = await store.download(ref, fd)
        body = os.pread(fd, ref.size, 0) if ref.size else b""
    finally:
        os.close(fd)
    return body, result.sha256_hex


def _make_lean(
    endpoint_url: str,
    bucket: str,
    region: str,
    addressing_style: str,
    credentials: Mapping[str, str] | None,
    verify_tls: bool,
    ca_bundle: str | Path | None,
    connect_timeout: float,
    read_timeout: float,
    max_connections: int,
) -> tuple[LeanGet, RangeGet] | None:
    """The lean GET clients for this store (whole small objects, parts of big ones), or None
    where the SDK must do every request.

    The SDK keeps: credential chains (only explicit keys are signed here), proxies, and the
    ``auto`` addressing style; ``Endpoint.for_bucket`` refuses what it does not handle.
    """
    if credentials is None or not credentials.get("access_key"):
        return None
    if any(os.environ.get(v) or os.environ.get(v.upper()) for v in _PROXY_VARIABLES):
        return None
    try:
        endpoint = Endpoint.for_bucket(endpoint_url, bucket, addressing_style)
    except ValueError:
        return None
    context = None
    if endpoint.tls:
        cafile = str(ca_bundle or os.environ.get("AWS_CA_BUNDLE") or "") or None
        if cafile is None:
            from botocore.httpsession import get_cert_path

            cafile = str(get_cert_path(True))
        context = ssl.create_default_context(cafile=cafile)
        if not verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    signer = SigV4(
        credentials["access_key"],
        credentials.get("secret_key", ""),
        credentials.get("token") or "",
        region,
    )
    options: dict[str, Any] = {
        "ssl_context": context,
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        "max_idle": max_connections,
    }
    return LeanGet(endpoint, signer, **options), RangeGet(endpoint, signer, **options)


async def _refused(
    put: Callable[[dict[str, str]], Awaitable[Any]], condition: dict[str, str]
) -> bool:
    """True when ``put`` with ``condition`` is refused as a failed precondition (412)."""
    try:
        await put(condition)
    except ObjectChangedError:
        return True
    except CredentialError:
        raise
    except StoreError:  # 501 NotImplemented, 400 for a header it does not know, ...
        return False
    return False


def _code(exc: BaseException) -> str:
    """The S3 error code behind a translated (and maybe retried) error ("": none)."""
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, bce.ClientError):
        cause = cause.__cause__
    if isinstance(cause, bce.ClientError):
        return str(cause.response.get("Error", {}).get("Code", ""))
    return ""


def _etag(value: object) -> str:
    return str(value or "").strip('"')


class S3Store:
    """An S3 bucket through aiobotocore: one client (and connection pool) per store instance.

    Credentials come from the usual AWS sources (env, shared files, ``profile``) unless the
    daemon passes them explicitly in ``credentials``. Botocore's own retries are switched off so
    that :mod:`hpcstage.retry` is the only retry policy. Objects of at least
    ``multipart_threshold`` bytes move in ``part_size`` parts, in parallel, at most
    ``max_connections`` at a time. A store belongs to the event loop that first uses it.
    """

    def __init__(
        self,
        endpoint_url: str | None,
        bucket: str,
        *,
        region: str = "us-east-1",
        profile: str | None = None,
        addressing_style: str = "path",
        verify_tls: bool = True,
        ca_bundle: str | Path | None = None,
        max_connections: int = 128,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        part_size: int = 64 * MIB,
        multipart_threshold: int = 256 * MIB,
        retry: RetryPolicy = DEFAULT_RETRY,
        credentials: Mapping[str, str] | None = None,
        on_retry: OnRetry | None = None,
        upload_memory: int = 1 * GIB,
        list_page_size: int = 1000,
        lean_get: bool = True,
        direct_writes: bool = True,
    ) -> None:
        if part_size < S3_MIN_PART or max_connections < 1:
            raise ValueError("part_size must be at least 5 MiB and max_connections at least 1")
        if addressing_style not in _ADDRESSING_STYLES:
            raise ValueError(f"addressing_style must be one of {_ADDRESSING_STYLES}")
        self.bucket = bucket
        self.store_id = (endpoint_url or f"https://s3.{region}.amazonaws.com").rstrip("/")
        self._part_size = part_size
        self._threshold = multipart_threshold
        self._max_connections = max_connections
        self._retry = retry
        self._on_retry = on_retry
        self._page_size = list_page_size
        self._budget = _MemoryBudget(upload_memory)
        self._client_args = self._make_client_args(
            endpoint_url, region, verify_tls, ca_bundle, credentials
        )
        self._config = AioConfig(
            max_pool_connections=max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": 1},  # hpcstage.retry is the one retry policy
            s3={"addressing_style": addressing_style},
            # Newer botocore adds CRC checksums many S3-compatible servers reject; we send
            # Content-MD5 and check ETags ourselves.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # "" and None both mean botocore's default chain; explicit credentials win over both.
        self._profile = (profile or None) if credentials is None else None
        self._stack = AsyncExitStack()
        self._lock = asyncio.Lock()
        self._probe_lock = asyncio.Lock()
        # Whether PutObject honours If-Match/If-None-Match (None: not probed yet; see
        # conditional_writes). rclone's server ignores both; AWS and moto honour them.
        self._conditional: bool | None = None
        self._conditional_complete = True  # False once Complete answered NotImplemented to it
        self._opaque_etags = False  # an object's MD5-looking ETag was none (SSE-KMS, SSE-C)
        self._s3: S3Client | None = None
        self._lean: LeanGet | None = None
        self._ranged: RangeGet | None = None
        self._range_threads: ThreadPoolExecutor | None = None
        self._direct = direct_writes
        self.write_stats = WriteStats()
        lean = None
        if lean_get:
            lean = _make_lean(
                self.store_id,
                bucket,
                region,
                addressing_style,
                credentials,
                verify_tls,
                ca_bundle,
                connect_timeout,
                read_timeout,
                max_connections,
            )
        if lean is not None:
            self._lean, self._ranged = lean

    @property
    def lean_stats(self) -> LeanStats | None:
        """What the lean GET path served and handed back (None when it is not used)."""
        return self._lean.stats if self._lean is not None else None

    @property
    def ranged_stats(self) -> LeanStats | None:
        """What the lean ranged GET of big objects' parts served and handed back."""
        return self._ranged.stats if self._ranged is not None else None

    @staticmethod
    def _make_client_args(
        endpoint_url: str | None,
        region: str,
        verify_tls: bool,
        ca_bundle: str | Path | None,
        credentials: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        verify: bool | str | None = None  # None: botocore's default (AWS_CA_BUNDLE or certifi)
        if not verify_tls:
            verify = False
        elif ca_bundle:
            verify = str(ca_bundle)
        args: dict[str, Any] = {"endpoint_url": endpoint_url, "region_name": region}
        args["verify"] = verify
        if credentials is not None:
            if not credentials.get("access_key") or not credentials.get("secret_key"):
                raise ValueError("credentials need an access_key and a secret_key")
            args["aws_access_key_id"] = credentials["access_key"]
            args["aws_secret_access_key"] = credentials["secret_key"]
            args["aws_session_token"] = credentials.get("token") or None
        return args

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the client and its connection pool (a later call opens a new one)."""
        async with self._lock:
            self._s3 = None
            await self._stack.aclose()
            if self._lean is not None:
                await self._lean.close()
            if self._range_threads is not None:
                self._range_threads.shutdown(wait=False)
                self._range_threads = None
            if self._ranged is not None:
                self._ranged.close()

    def url(self, key: str) -> str:
        """``s3://bucket/key``, as messages name objects (control characters escaped)."""
        return f"s3://{self.bucket}/{shown(key)}"

    async def _client(self) -> S3Client:
        if self._s3 is not None:
            return self._s3
        # Created lazily inside the running loop: aiohttp sessions belong to one event loop.
        async with self._lock:
            if self._s3 is None:
                session = AioSession(profile=self._profile)
                # Dates in answers are never used; parsing 1,000 per listing page costs CPU.
                parsers = session.get_component("response_parser_factory")
                parsers.set_parser_defaults(timestamp_parser=str)
                creator = session.create_client("s3", config=self._config, **self._client_args)
                self._s3 = await self._stack.enter_async_context(creator)
            return self._s3

    async def _request(self, op: str, key: str, fn: Callable[[S3Client], Awaitable[T]]) -> T:
        """One request, vendor errors translated; no retry."""
        try:
            client = await self._client()
        except _VENDOR_ERRORS as exc:
            raise translate_s3_error(exc, f"{op} {self.url(key)}") from exc
        try:
            return await fn(client)
        except _VENDOR_ERRORS as exc:
            raise translate_s3_error(exc, f"{op} {self.url(key)}") from exc
        except _MALFORMED as exc:
            raise malformed_response(exc, f"{op} {self.url(key)}") from exc

    async def _call(self, op: str, key: str, fn: Callable[[S3Client], Awaitable[T]]) -> T:
        """One request, retried by the policy."""
        return await self._retried(op, key, lambda: self._request(op, key, fn))

    async def _retried(self, op: str, key: str, attempt: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(self._retry, f"{op} {self.url(key)}", attempt, self._on_retry)

    def _ref(self, key: str, etag: object, size: int) -> ObjectRef:
        return ObjectRef(self.store_id, self.bucket, key, _etag(etag), size)

    def _checked_ref(self, where: str, key: object, etag: object, size: object) -> ObjectRef:
        """An ObjectRef from what the server said, refusing what cannot identify an object.

        Without an ETag the bytes could be neither verified nor told apart from a changed
        object of the same size; a size that is not a non-negative integer is no size.
        """
        if not isinstance(key, str) or not key:
            raise StoreError(f"{where}: the store sent an entry without a key")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            what = "no size" if size is None else f"the size {shown(repr(size))}"
            raise StoreError(f"{where}: the store gave {self.url(key)} {what}")
        if not _etag(etag):
            raise StoreError(
                f"{where}: the store gave {self.url(key)} no ETag; its bytes cannot be verified"
            )
        return self._ref(key, etag, size)

    # -- list / head ---------------------------------------------------------------------------

    async def list(self, prefix: str, *, start_after: str = "") -> AsyncIterator[ObjectRef]:
        """Stream the objects under ``prefix``, one ListObjectsV2 page at a time; with
        ``start_after``, those after that key only (the recycle bin's pages).

        The continuation-token loop is written out rather than using botocore's paginator so
        that each page is retried on its own: a failure on page 900 of a 10^6-key listing
        neither restarts the listing nor yields a key twice. Only one page is held at a time.
        Keys ending in "/" are folder markers made by S3 consoles, not data, and are skipped.
        """
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        params["MaxKeys"] = self._page_size
        if start_after:
            params["StartAfter"] = start_after
        where = f"list {self.url(prefix)}"
        tokens: set[str] = set()
        while True:
            page = await self._call("list", prefix, lambda c: c.list_objects_v2(**params))
            if "IsTruncated" not in page:
                # An HTML page or foreign XML parses to nothing: that is no listing, and taking
                # it for the last page would stage part of an input as if it were all of it.
                raise StoreError(f"{where}: the store's answer is not a listing")
            token = page.get("NextContinuationToken")
            more = bool(page.get("IsTruncated") and token)
            if more:
                # Checked before the page is used: a repeated page yields nothing twice.
                if token in tokens:
                    raise StoreError(f"{where}: the store's listing goes round in circles")
                tokens.add(token)  # one short string per page: 1000 for a 10^6-key prefix
            for item in page.get("Contents", []):
                key = item.get("Key")
                if isinstance(key, str) and not key.startswith(prefix):
                    raise StoreError(f"{where}: the store listed {self.url(key)}, not under it")
                if isinstance(key, str) and key.endswith("/"):
                    continue
                yield self._checked_ref(where, key, item.get("ETag"), item.get("Size"))
            if not more:
                return
            params["ContinuationToken"] = token

    async def head(self, key: str) -> ObjectRef:
        """The object's identity from a HEAD request."""
        return (await self._head(key))[0]

    async def _head(self, key: str) -> tuple[ObjectRef, Mapping[str, Any]]:
        answer = await self._call("head", key, lambda c: c.head_object(Bucket=self.bucket, Key=key))
        ref = self._checked_ref(
            f"head {self.url(key)}", key, answer.get("ETag"), answer.get("ContentLength")
        )
        return ref, answer

    async def describe(self, key: str) -> Described | None:
        """The object at ``key`` as stage-out compares it with a file (None: no object)."""
        try:
            ref, answer = await self._head(key)
        except ObjectMissingError:
            return None
        sha256 = str((answer.get("Metadata") or {}).get(SHA256_METADATA, "")).lower()
        return Described(ref, sha256, etag_is_md5(ref.etag, answer))

    # -- download ------------------------------------------------------------------------------

    async def download(
        self, ref: ObjectRef, dest_fd: int, *, progress: Progress | None = None
    ) -> DownloadResult:
        """Fetch ``ref`` into ``dest_fd``: one GET, or parallel ranged GETs for big objects.

        ``dest_fd`` must be open O_RDWR: parts land out of order, so an MD5 or SHA of a
        multipart download is computed by reading the written file back (a CRC the store
        keeps is computed part by part as the bytes arrive, and combined). An object above
        ``LEAN_MAX`` is first asked for with a HEAD whether the store keeps a full-object
        checksum of it. A checksum mismatch of a single GET is retried; one of a multipart
        download raises TransientStoreError at once (which part was bad is unknown; the
        caller fetches the object again). Parts fetched by the lean ranged GET and checked
        part by part are written with O_DIRECT where the file system allows it
        (``direct_writes``; see ``hpcstage.store.libc.PartSink``).
        """
        self._check_owns(ref)
        lean = await self.lean_bytes(ref)
        if lean is not None:
            body, sha256_hex, md5_hex = lean
            await _write_body(dest_fd, body)
            _PartProgress(progress).update(0, len(body))
            return DownloadResult(sha256_hex, len(body), "md5" if md5_hex else "")
        stored, md5_etag = await self._head_checks(ref) if ref.size > LEAN_MAX else (None, True)
        if ref.size < self._threshold:
            tracker = _PartProgress(progress)
            return await self._retried(
                "get", ref.key, lambda: self._get_whole(ref, dest_fd, tracker, stored)
            )
        parts = _parts(ref.size, self._part_size)
        checks = _Checks.choose(ref, stored, md5_etag)
        by_parts = checks.by_parts(parts)
        # Only writeback hints are left to do in part order when the parts are checked as
        # they arrive (the SDK's fallback path does not give them as it writes).
        read_back = [] if by_parts else checks.hashers()
        hasher = _InOrderHash(dest_fd, parts, read_back)
        # Read back and hashed in order: parts started in order and a few at a time land in
        # order, so the hashing follows the download closely instead of starting when the
        # last part lands.
        in_flight = min(len(parts), READ_BACK_PARTS) if read_back else len(parts)
        tracker = _PartProgress(progress, hasher.landed, hasher.restart)
        await asyncio.to_thread(preallocate, dest_fd, ref.size)  # no room: fail before any GET
        direct_fd = self._open_direct(dest_fd, parts) if by_parts else -1
        try:
            await self._get_parts(
                ref, parts, tracker, hasher.part_done, checks, (dest_fd, direct_fd), in_flight
            )
            await hasher.finish(self.url(ref.key))
        finally:
            await hasher.cancel()
            if direct_fd >= 0:
                os.close(direct_fd)
        stats = self.write_stats
        if by_parts:
            stats.checked_inline += 1
        else:
            stats.read_back += 1
        return checks.verify(self.url(ref.key))

    def _open_direct(self, fd: int, parts: Sequence[_Part]) -> int:
        """An O_DIRECT descriptor of ``fd``'s file for the lean ranged GET, or -1 (off, no
        lean ranged GET, parts off the alignment, or not possible there)."""
        if not self._direct or self._ranged is None or not self._ranged.enabled:
            return -1
        if any(part.offset % DIRECT_ALIGN for part in parts):
            return -1  # part sizes grown to fit 10,000 parts need not be aligned
        try:
            direct_fd = open_direct(fd)
        except OSError as exc:
            if exc.errno in DIRECT_UNSUPPORTED:
                self._give_up_direct(f"the cache's file system refuses O_DIRECT ({exc.strerror})")
            return -1  # else (out of descriptors, ...) this once
        if direct_fd < 0:
            self._give_up_direct("no O_DIRECT on this platform")
        return direct_fd

    def _give_up_direct(self, why: str) -> None:
        if self._direct:
            self._direct = False
            self.write_stats.direct_refused = why
            log.info("big downloads go through the page cache from now on: %s", why)

    async def stored_checksum(self, ref: ObjectRef) -> StoreChecksum | None:
        """The full-object checksum the store keeps for ``ref``'s version, if any (one HEAD).

        ObjectChangedError when the object is no longer the one listed (its checksum would
        describe other bytes)."""
        return (await self._head_checks(ref))[0]

    async def _head_checks(self, ref: ObjectRef) -> tuple[StoreChecksum | None, bool]:
        """``stored_checksum``, and whether ``ref``'s ETag is the MD5 of its bytes (no SSE-KMS
        or SSE-C: the listing cannot tell)."""
        answer = await self._call(
            "head",
            ref.key,
            lambda c: c.head_object(Bucket=self.bucket, Key=ref.key, ChecksumMode="ENABLED"),
        )
        self._check_same(ref, answer.get("ETag"))
        if answer.get("ContentLength") != ref.size:
            raise ObjectChangedError(
                f"head {self.url(ref.key)}: the object changed since it was listed"
                f" ({answer.get('ContentLength')} bytes, listed with {ref.size})"
            )
        return checksums.from_response(answer), self._md5_etag(ref, answer)

    def _md5_etag(self, ref: ObjectRef, answer: Mapping[str, Any]) -> bool:
        """``etag_is_md5`` of an answer about ``ref``; an MD5-looking ETag that is none (SSE)
        turns the lean GET off for this store: it could only check such objects by their
        ETag, fail, and fall back to the SDK every time."""
        md5 = etag_is_md5(ref.etag, answer)
        if not md5 and _PLAIN_MD5.fullmatch(ref.etag) and not self._opaque_etags:
            self._opaque_etags = True
            log.info("%s: encrypted objects (SSE-KMS/SSE-C): their ETags are no MD5", self.url(""))
        return md5

    def _check_owns(self, ref: ObjectRef) -> None:
        if (ref.store, ref.bucket) != (self.store_id, self.bucket):
            raise ValueError(f"{ref} does not belong to {self.store_id} bucket {self.bucket}")

    async def lean_bytes(self, ref: ObjectRef) -> tuple[bytes, str, str] | None:
        """A small object's bytes, SHA-256 and MD5 ("" unless the ETag is one) through the lean
        GET (hpcstage.store.lean), or None when it does not apply or falls back: then the SDK
        path must fetch it."""
        lean = self._lean
        if lean is None or ref.size > LEAN_MAX or ref.size >= self._threshold:
            return None
        if self._opaque_etags:
            return None
        self._check_owns(ref)
        body = await lean.get(ref.key, ref.size, ref.etag)
        if body is None:
            return None
        md5 = ""
        if _PLAIN_MD5.fullmatch(ref.etag):
            md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
            if _md5_contradicts(ref.etag, md5):
                return None  # the SDK path fetches again, verifies and retries or reports
        return body, hashlib.sha256(body).hexdigest(), md5

    async def _get_whole(
        self, ref: ObjectRef, fd: int, tracker: _PartProgress, stored: StoreChecksum | None
    ) -> DownloadResult:
        answer = await self._request(
            "get", ref.key, lambda c: c.get_object(Bucket=self.bucket, Key=ref.key)
        )
        checks = _Checks.choose(ref, stored, self._md5_etag(ref, answer))
        async with answer["Body"] as body:  # released to the pool whatever happens
            self._check_same(ref, answer.get("ETag"))
            self._check_announced(ref, answer.get("ContentLength"))
            got = await self._stream(ref.key, body, fd, 0, checks.hashers(), 0, tracker, ref.size)
        self._check_count(ref.key, got, ref.size)
        return checks.verify(self.url(ref.key))

    async def _get_parts(
        self,
        ref: ObjectRef,
        parts: Sequence[_Part],
        tracker: _PartProgress,
        done: Callable[[_Part], None],
        checks: _Checks,
        fds: tuple[int, int],
        in_flight: int,
    ) -> None:
        """Fetch ``parts`` into ``fds = (fd, direct_fd)`` (direct_fd: -1 or ``fd``'s file
        opened O_DIRECT), each checksummed by ``checks.part`` when checked part by part, at
        most ``in_flight`` (and ``max_connections``) at a time."""
        fd, direct_fd = fds

        async def one(part: _Part) -> None:
            sink = PartSink(fd, direct_fd, checks.part(part))
            if not await self._lean_range(ref, sink, part, tracker):
                await self._retried(
                    "get", ref.key, lambda: self._get_range(ref, fd, part, tracker, checks)
                )
            done(part)

        await _run_bounded(parts, one, min(self._max_connections, in_flight))

    async def _lean_range(
        self, ref: ObjectRef, sink: PartSink, part: _Part, tracker: _PartProgress
    ) -> bool:
        """One part through the lean ranged GET in a worker thread; False: the SDK must."""
        ranged = self._ranged
        if ranged is None or not ranged.enabled:
            return False
        if self._range_threads is None:
            self._range_threads = ThreadPoolExecutor(
                self._max_connections, thread_name_prefix="hpcstage-range"
            )
        loop = asyncio.get_running_loop()
        abort = RangeAbort()

        def on_bytes(done: int) -> None:
            loop.call_soon_threadsafe(tracker.update, part.number, done)

        future = loop.run_in_executor(
            self._range_threads,
            ranged.fetch,
            ref.key,
            (ref.size, ref.etag),
            (part.offset, part.length),
            sink,
            on_bytes,
            abort,
        )
        try:
            served = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The caller closes the file next: the thread must have stopped writing to it first.
            abort.abort()
            await asyncio.wait([future])
            raise
        finally:
            self.write_stats.direct_bytes += sink.direct_bytes
        if sink.direct_refused is not None:
            self._give_up_direct(f"a direct write was refused: {sink.direct_refused}")
        return served

    async def _get_range(
        self, ref: ObjectRef, fd: int, part: _Part, tracker: _PartProgress, checks: _Checks
    ) -> None:
        last = part.offset + part.length - 1
        answer = await self._request(
            "get",
            ref.key,
            lambda c: c.get_object(
                Bucket=self.bucket, Key=ref.key, Range=f"bytes={part.offset}-{last}"
            ),
        )
        async with answer["Body"] as body:
            self._check_same(ref, answer.get("ETag"))
            if answer.get("ContentLength") != part.length:
                raise StoreError(f"get {self.url(ref.key)}: the store ignored a ranged GET")
            checksum = checks.part(part)  # from the part's first byte, on every attempt
            hashers = () if checksum is None else (checksum,)
            tracker.restart(part.number)
            got = await self._stream(
                ref.key, body, fd, part.offset, hashers, part.number, tracker, part.length
            )
        self._check_count(ref.key, got, part.length)

    async def _stream(
        self,
        key: str,
        body: StreamingBody,
        fd: int,
        offset: int,
        hashers: Sequence[Any],
        part: int,
        tracker: _PartProgress,
        expected: int,
    ) -> int:
        """Copy a response body into ``fd`` at ``offset`` in 1 MiB writes; return the count.

        A body longer than ``expected`` is refused before its excess is written: a broken or
        hostile server must not fill the node's disk through one small listed object.
        """
        written = 0
        while chunk := await self._read_chunk(key, body):
            self._check_count(key, written + len(chunk), expected, at_most=True)
            # pwrite and hashing run in a thread: hashlib releases the GIL, the loop stays free.
            await asyncio.to_thread(_pwrite_all, fd, chunk, offset + written, hashers)
            written += len(chunk)
            tracker.update(part, written)
        return written

    async def _read_chunk(self, key: str, body: StreamingBody) -> bytearray:
        buffer = bytearray()
        try:
            while len(buffer) < _STREAM_CHUNK:
                piece = await body.read(_STREAM_CHUNK - len(buffer))
                if not piece:
                    break
                buffer += piece
        except _VENDOR_ERRORS as exc:
            raise translate_s3_error(exc, f"get {self.url(key)}") from exc
        return buffer

    def _check_same(self, ref: ObjectRef, etag: object) -> None:
        # The ETag of each response, not If-Match: not every S3 server honours If-Match.
        if ref.etag and etag and _etag(etag) != ref.etag:
            raise ObjectChangedError(
                f"get {self.url(ref.key)}: the object changed since it was listed"
            )

    def _check_announced(self, ref: ObjectRef, announced: object) -> None:
        """A whole GET's Content-Length must be the listed size (before any byte is read)."""
        if not isinstance(announced, int) or announced == ref.size:
            return  # no Content-Length: the byte count of the body decides
        what = "truncated: " if announced < ref.size else ""
        raise TransientStoreError(
            f"get {self.url(ref.key)}: {what}the store announced {announced} bytes"
            f" (Content-Length) for an object listed with {ref.size}"
        )

    def _check_count(self, key: str, got: int, expected: int, at_most: bool = False) -> None:
        """``got`` bytes must be ``expected`` (with ``at_most``: must not exceed it)."""
        if got > expected:
            raise TransientStoreError(
                f"get {self.url(key)}: the store sent more than the {expected} bytes listed"
            )
        if got < expected and not at_most:
            raise TransientStoreError(
                f"get {self.url(key)}: truncated: got {got} of {expected} bytes"
            )

    # -- upload --------------------------------------------------------------------------------

    async def upload(
        self,
        path: Path,
        key: str,
        *,
        progress: Progress | None = None,
        only_if: Precondition | None = None,
        journal: UploadLog | None = None,
        sha256: str = "",
    ) -> ObjectRef:
        """PUT ``path`` as ``key`` (multipart for big files; aborted on any failure).

        ``sha256`` (the file's, if the caller computed it) is kept in the object's metadata
        (``SHA256_METADATA``): where the ETag is no MD5 (multipart, SSE-KMS, SSE-C) it is what
        tells a later stage-out that the object already holds the file.

        ``only_if``: write only if ``key`` still holds what the caller saw, else raise
        ObjectChangedError and write nothing. Where the store honours conditional writes (see
        ``conditional_writes``) the PUT (or CompleteMultipartUpload) carries If-Match or
        If-None-Match: * and the store decides atomically. Elsewhere, and for every multipart
        upload (some servers ignore the condition on Complete), the key is HEADed again right
        before the write: that leaves a race of one round trip, not of the whole upload.
        ``journal`` hears of every multipart upload opened and ended.
        """
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return await self.upload_fd(
                fd, key, progress=progress, only_if=only_if, journal=journal, sha256=sha256
            )
        finally:
            os.close(fd)

    async def upload_fd(
        self,
        fd: int,
        key: str,
        *,
        progress: Progress | None = None,
        only_if: Precondition | None = None,
        journal: UploadLog | None = None,
        sha256: str = "",
    ) -> ObjectRef:
        """``upload`` of the file open as ``fd``: the bytes of that file, whatever its path
        names by now (stage-out checks a file on its fd, then uploads from it)."""
        size = os.fstat(fd).st_size
        tracker = _PartProgress(progress)
        meta = {SHA256_METADATA: sha256} if sha256 else {}
        if size < self._threshold:
            etag = await self._put_whole(fd, key, size, tracker, only_if, meta)
            return self._ref(key, etag, size)
        await self._put_parts(fd, key, size, tracker, only_if, journal, meta)
        # Servers disagree on a multipart object's ETag (S3: md5-of-parts "-N"; some: the
        # whole MD5) between Complete and HEAD; the identity must be what listings will show.
        ref = await self.head(key)
        if ref.size != size:
            raise StoreError(f"put {self.url(key)}: stored {ref.size} bytes of {size}")
        return ref

    async def _put_whole(
        self,
        fd: int,
        key: str,
        size: int,
        tracker: _PartProgress,
        only_if: Precondition | None,
        meta: dict[str, str],
    ) -> str:
        async with self._budget.reserve(size):
            data, md5 = await asyncio.to_thread(_read_with_md5, fd, 0, size)
            if only_if is not None and not self._conditional:
                await self._check_precondition(key, only_if)
            answer = await self._retried(
                "put", key, lambda: self._put_once(key, data, md5, self._condition(only_if), meta)
            )
        tracker.update(0, size)
        return answer

    def _condition(self, only_if: Precondition | None) -> dict[str, str]:
        """The conditional header to send: none where the store was not seen to honour them."""
        return only_if.headers() if only_if is not None and self._conditional else {}

    async def _check_precondition(self, key: str, only_if: Precondition) -> None:
        """The fallback for stores that ignore conditional headers: look right before writing."""
        if not only_if.holds(await self.head_or_none(key)):
            raise ObjectChangedError(f"put {self.url(key)}: the object changed since it was seen")

    async def _put_once(
        self,
        key: str,
        data: bytes,
        md5: bytes,
        condition: Mapping[str, str],
        meta: dict[str, str],
    ) -> str:
        try:
            answer = await self._request(
                "put",
                key,
                lambda c: c.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    ContentMD5=base64.b64encode(md5).decode(),
                    Metadata=meta,
                    **condition,  # type: ignore[arg-type]
                ),
            )
        except ObjectMissingError as exc:
            if "IfMatch" in condition and _code(exc) == "NoSuchKey":
                # If-Match on a key deleted meanwhile: it changed, it is not a missing bucket.
                raise ObjectChangedError(f"put {self.url(key)}: the object was deleted") from exc
            raise
        etag = _etag(answer.get("ETag"))
        if etag_is_md5(etag, answer):  # else the server checked the body by its Content-MD5
            _check_md5(self.url(key), etag, md5.hex())
        return etag

    async def _put_parts(
        self,
        fd: int,
        key: str,
        size: int,
        tracker: _PartProgress,
        only_if: Precondition | None,
        journal: UploadLog | None,
        meta: dict[str, str],
    ) -> None:
        async def send(upload_id: str, part: _Part) -> str:
            # Streamed from the file, never held whole: a part of a 100 TiB file is 10 GiB.
            md5 = await asyncio.to_thread(_md5_of_range, fd, part.offset, part.length)
            etag = await self._retried(
                "put part", key, lambda: self._put_part_once(key, upload_id, part, fd, md5)
            )
            tracker.update(part.number, part.length)
            return etag

        await self._multipart(key, _parts(size, self._part_size), send, only_if, journal, meta)

    async def _put_part_once(
        self, key: str, upload_id: str, part: _Part, fd: int, md5: bytes
    ) -> str:
        answer = await self._request(
            "put part",
            key,
            lambda c: c.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=part.number,
                Body=cast("IO[bytes]", _FileRange(fd, part.offset, part.length)),
                ContentLength=part.length,
                ContentMD5=base64.b64encode(md5).decode(),
            ),
        )
        etag = str(answer.get("ETag", ""))
        if etag_is_md5(_etag(etag), answer):  # under SSE-KMS/SSE-C the Content-MD5 is the check
            _check_md5(self.url(key), _etag(etag), md5.hex())
        return etag

    async def _multipart(
        self,
        key: str,
        parts: Sequence[_Part],
        send: Callable[[str, _Part], Awaitable[str]],
        only_if: Precondition | None = None,
        journal: UploadLog | None = None,
        meta: dict[str, str] | None = None,
    ) -> None:
        """Create a multipart upload, ``send`` every part in parallel, complete it.

        On any failure, cancellation included, the upload is aborted: an abandoned multipart
        upload keeps its parts (and their cost) in the bucket invisibly and forever.
        ``journal`` is told of the upload before its first part and after its end, so that
        the uploads of a writer killed mid-way are aborted by it, not by another writer.
        """
        created = await self._call(
            "create multipart",
            key,
            lambda c: c.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata=meta or {}),
        )
        upload_id = created["UploadId"]
        if journal is not None:
            journal.opened(key, upload_id)
        etags: dict[int, str] = {}

        async def one(part: _Part) -> None:
            etags[part.number] = await send(upload_id, part)

        try:
            await _run_bounded(parts, one, min(self._max_connections, len(parts)))
            if only_if is not None:
                await self._check_precondition(key, only_if)  # some servers ignore it on Complete
            await self._complete_on(key, upload_id, etags, only_if)
        except BaseException:
            aborted = await asyncio.shield(self.abort(key, upload_id))
            if aborted and journal is not None:
                journal.closed(upload_id)  # else it stays listed, for the next attempt to abort
            raise
        if journal is not None:
            journal.closed(upload_id)

    async def _complete_on(
        self, key: str, upload_id: str, etags: dict[int, str], only_if: Precondition | None
    ) -> None:
        """Complete on ``only_if`` (already checked by a HEAD): with the conditional header
        where the store honours it, and without where it is not implemented on Complete."""
        condition = self._condition(only_if) if self._conditional_complete else {}
        try:
            await self._complete(key, upload_id, etags, condition)
        except TransientStoreError as exc:
            if not condition or _code(exc) != "NotImplemented":
                raise
            self._conditional_complete = False
            log.warning("%s: no conditional CompleteMultipartUpload; HEAD only", self.url(""))
            await self._complete(key, upload_id, etags, {})

    async def _complete(
        self, key: str, upload_id: str, etags: dict[int, str], condition: Mapping[str, str]
    ) -> None:
        done: list[CompletedPartTypeDef] = [
            {"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)
        ]
        await self._call(
            "complete multipart",
            key,
            lambda c: c.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": done},
                **condition,  # type: ignore[arg-type]
            ),
        )

    async def abort(self, key: str, upload_id: str) -> bool:
        """Abort one multipart upload; False (logged, not raised) when that failed.

        An upload that is already gone (NoSuchUpload) counts as aborted.
        """
        try:
            await self._call(
                "abort multipart",
                key,
                lambda c: c.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id),
            )
        except ObjectMissingError:
            return True
        except StoreError as exc:
            log.warning("could not abort multipart upload %s: %s", upload_id, exc)
            return False
        return True

    async def conditional_writes(self, probe_key: str) -> bool:
        """Whether this store honours If-Match and If-None-Match on PutObject (asked once).

        Probed at ``probe_key`` (a key of hpcstage's own, e.g. under the recycle bin): an
        empty object is written, then written again under each condition, which must be
        refused with 412; then it is deleted. A store that ignores the headers (rclone's
        server), or refuses them as not implemented (501), is written to without them, and
        ``upload`` HEADs the key right before each write instead.
        """
        async with self._probe_lock:
            if self._conditional is None:
                self._conditional = await self._probe_conditions(probe_key)
                if not self._conditional:
                    log.warning(
                        "%s ignores conditional writes: a write is preceded by a HEAD instead",
                        self.url(""),
                    )
        return self._conditional

    async def _probe_conditions(self, key: str) -> bool:
        async def put(condition: dict[str, str]) -> Any:
            return await self._request(
                "probe",
                key,
                lambda c: c.put_object(Bucket=self.bucket, Key=key, Body=b"", **condition),  # type: ignore[arg-type]
            )

        await self._retried("probe", key, lambda: put({}))
        try:
            refused = [await _refused(put, p.headers()) for p in (Precondition(), _NO_ETAG)]
        finally:
            await self.delete(key)
        return all(refused)

    # -- copy / delete -------------------------------------------------------------------------

    async def copy(
        self,
        src_key: str,
        dst_key: str,
        *,
        if_match: str = "",
        only_if: Precondition | None = None,
    ) -> None:
        """Server-side copy; in parts above CopyObject's 5 GiB limit.

        ``if_match``: copy only the version with that ETag (x-amz-copy-source-if-match; some
        servers ignore it, so a caller that depends on it checks the copy afterwards).
        ``only_if``: copy only while ``dst_key`` holds what the caller saw, checked by a HEAD
        right before (conditional CopyObject is not as widely honoured as conditional PUT).
        """
        source = await self.head(src_key)
        if only_if is not None:
            await self._check_precondition(dst_key, only_if)
        if if_match and source.etag != if_match:
            raise ObjectChangedError(f"copy {self.url(src_key)}: the object changed")
        if source.size <= S3_MAX_COPY:
            condition = {"CopySourceIfMatch": f'"{source.etag}"'} if if_match else {}
            await self._call(
                "copy",
                dst_key,
                lambda c: c.copy_object(
                    Bucket=self.bucket,
                    Key=dst_key,
                    CopySource={"Bucket": self.bucket, "Key": src_key},
                    **condition,  # type: ignore[arg-type]
                ),
            )
            return
        await self._copy_parts(source, dst_key)

    async def _copy_parts(self, source: ObjectRef, dst_key: str) -> None:
        async def send(upload_id: str, part: _Part) -> str:
            last = part.offset + part.length - 1
            answer = await self._call(
                "copy part",
                dst_key,
                lambda c: c.upload_part_copy(
                    Bucket=self.bucket,
                    Key=dst_key,
                    UploadId=upload_id,
                    PartNumber=part.number,
                    CopySource={"Bucket": self.bucket, "Key": source.key},
                    CopySourceRange=f"bytes={part.offset}-{last}",
                    CopySourceIfMatch=f'"{source.etag}"',
                ),
            )
            return str(answer.get("CopyPartResult", {}).get("ETag", ""))

        # Parts of at least 1 GiB: the bytes stay in the store, so only the request count matters.
        await self._multipart(dst_key, _parts(source.size, max(self._part_size, GIB)), send)

    async def head_or_none(self, key: str) -> ObjectRef | None:
        """The object's identity, or None when there is no object at ``key``."""
        try:
            return await self.head(key)
        except ObjectMissingError:
            return None

    async def delete(self, key: str) -> None:
        """DeleteObject (S3 answers success for a missing key too)."""
        await self._call("delete", key, lambda c: c.delete_object(Bucket=self.bucket, Key=key))


# --------------------------------------------------------------------------------------------
# Shared filesystem
# --------------------------------------------------------------------------------------------

# Errors a network filesystem (NFS, Lustre, GPFS) returns while a server fails over.
_TRANSIENT_ERRNOS: Final = frozenset(
    {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ENOLCK}
    | {errno.ECONNRESET, errno.ECONNREFUSED, errno.EHOSTDOWN, errno.EHOSTUNREACH}
)


def translate_fs_error(exc: OSError, where: str) -> StoreError:
    """Map an OSError on the shared filesystem to the hpcstage tree; ``where`` is "OP path"."""
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return ObjectMissingError(f"{where}: no such file")
    if isinstance(exc, PermissionError):
        return CredentialError(f"{where}: permission denied")
    message = f"{where}: {exc.strerror or exc}"
    if exc.errno in _TRANSIENT_ERRNOS:
        return TransientStoreError(message)
    return StoreError(message)


class FsStore:
    """Absolute paths under ``root`` on a shared filesystem, behind the same contract.

    Keys are absolute paths; ``ObjectRef.etag`` is the mtime in nanoseconds. Paths with ``..``
    and symlinks that resolve outside ``root`` are refused; listing skips such symlinks and does
    not descend into symlinked directories (they can form cycles). Writes go to a temporary
    file that is fsynced and renamed into place. Blocking calls run in threads: metadata
    operations on a busy parallel filesystem can take a while.
    """

    store_id: Final = "file"

    def __init__(
        self, root: Path, *, retry: RetryPolicy = DEFAULT_RETRY, on_retry: OnRetry | None = None
    ) -> None:
        if not root.is_absolute():
            raise ValueError(f"{root}: the root of a filesystem store must be absolute")
        self.root = Path(os.path.normpath(root))
        self._real_root = Path(os.path.realpath(root))
        self._retry = retry
        self._on_retry = on_retry

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Nothing to release: every file is closed when its call ends."""

    def url(self, key: str) -> str:
        """The key itself: an absolute path."""
        return key

    def _checked(self, key: str) -> Path:
        """The real path of ``key``, after refusing relative paths, '..' and escapes from root."""
        path = Path(key)
        if not path.is_absolute() or ".." in path.parts:
            raise StoreError(f"{key}: expected an absolute path without '..'")
        if not path.is_relative_to(self.root):
            raise StoreError(f"{key}: outside the store's root {self.root}")
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self._real_root):
            raise StoreError(f"{key}: a symlink leads outside {self.root}")
        return real

    def _ref(self, key: str, stat: os.stat_result) -> ObjectRef:
        return ObjectRef(self.store_id, "", key, str(stat.st_mtime_ns), stat.st_size)

    async def _retried(self, op: str, key: str, attempt: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(self._retry, f"{op} {key}", attempt, self._on_retry)

    async def _fs(self, op: str, key: str, fn: Callable[[], T]) -> T:
        """Run a blocking filesystem call in a thread, its OSError translated; no retry."""
        try:
            return await asyncio.to_thread(fn)
        except OSError as exc:
            raise translate_fs_error(exc, f"{op} {key}") from exc

    # -- list / head ---------------------------------------------------------------------------

    async def list(self, prefix: str, *, batch: int = 1000) -> AsyncIterator[ObjectRef]:
        """Walk the files whose path starts with ``prefix`` (string prefix, as on S3).

        The walk is one generator advanced ``batch`` entries per thread hop, so a tree of 10^6
        files streams with flat memory and a slow metadata server never blocks the loop. A
        missing directory lists nothing, as an empty S3 prefix does. A failure ends the listing
        (a half-walked generator cannot be resumed, so the listing is not retried).
        """
        if prefix == str(self.root):
            prefix += "/"  # the root itself: its files (nothing beside it belongs to this store)
        directory, _, stem = prefix.rpartition("/")
        start = await asyncio.to_thread(self._checked, directory or "/")
        walk = self._walk(str(start), directory or "/", stem)
        try:
            while refs := await self._fs("list", prefix, lambda: _take(walk, batch)):
                for ref in refs:
                    yield ref
        finally:
            walk.close()  # closes the scandir iterators (directory fds) of an abandoned walk

    def _walk(self, real_dir: str, key_dir: str, stem: str) -> Generator[ObjectRef, None, None]:
        try:
            entries = os.scandir(real_dir)
        except (FileNotFoundError, NotADirectoryError):
            return
        with entries:
            for entry in entries:
                if entry.name.startswith(stem):
                    yield from self._entry(entry, os.path.join(key_dir, entry.name))

    def _entry(self, entry: os.DirEntry[str], key: str) -> Iterator[ObjectRef]:
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(entry.path, key, "")
            elif entry.is_symlink():
                yield from self._symlink(entry, key)
            elif entry.is_file(follow_symlinks=False):
                yield self._ref(key, entry.stat(follow_symlinks=False))
        except FileNotFoundError:
            pass  # deleted while we walked: a listing is a snapshot, and it was not there

    def _symlink(self, entry: os.DirEntry[str], key: str) -> Iterator[ObjectRef]:
        real = Path(os.path.realpath(entry.path))
        if not real.is_relative_to(self._real_root):
            log.warning("%s: skipped, a symlink leading outside %s", key, self.root)
            return
        stat = real.stat()
        if S_ISREG(stat.st_mode):
            yield self._ref(key, stat)

    async def head(self, key: str) -> ObjectRef:
        """The file's identity from stat()."""
        real = await asyncio.to_thread(self._checked, key)
        stat = await self._retried("head", key, lambda: self._fs("head", key, real.stat))
        if not S_ISREG(stat.st_mode):
            raise StoreError(f"head {key}: not a regular file")
        return self._ref(key, stat)

    # -- download ------------------------------------------------------------------------------

    async def download(
        self, ref: ObjectRef, dest_fd: int, *, progress: Progress | None = None
    ) -> DownloadResult:
        """Copy the file into ``dest_fd`` with pread/pwrite, hashing as it goes."""
        if ref.store != self.store_id:
            raise ValueError(f"{ref} does not belong to a filesystem store")
        real = await asyncio.to_thread(self._checked, ref.key)
        tracker = _PartProgress(progress)
        return await self._retried(
            "read", ref.key, lambda: self._copy_out(ref, real, dest_fd, tracker)
        )

    async def _copy_out(
        self, ref: ObjectRef, real: Path, dest_fd: int, tracker: _PartProgress
    ) -> DownloadResult:
        # O_NOFOLLOW: a symlink swapped in after _checked() is refused, not followed.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        src = await self._fs("open", ref.key, lambda: os.open(real, flags))
        try:
            await self._check_same(ref, src)
            sha256 = hashlib.sha256() if ref.size <= LEAN_MAX else None
            hashers = [sha256] if sha256 is not None else []
            got = await _copy_loop(
                lambda n, off: self._fs("read", ref.key, lambda: os.pread(src, n, off)),
                lambda data, off: asyncio.to_thread(_pwrite_all, dest_fd, data, off, hashers),
                ref.size,
                lambda done: tracker.update(0, done),
            )
            await self._check_same(ref, src)  # changed while we copied?
        finally:
            os.close(src)
        if got != ref.size:
            raise TransientStoreError(f"read {ref.key}: truncated: got {got} of {ref.size} bytes")
        # A file has nothing to check content against (no ETag, no checksum): size and mtime.
        return DownloadResult(sha256.hexdigest() if sha256 is not None else "", got, "")

    async def _check_same(self, ref: ObjectRef, fd: int) -> None:
        stat = await self._fs("stat", ref.key, lambda: os.fstat(fd))
        if (str(stat.st_mtime_ns), stat.st_size) != (ref.etag, ref.size):
            raise ObjectChangedError(f"read {ref.key}: the file changed since it was listed")

    # -- upload / copy / delete ----------------------------------------------------------------

    async def upload(self, path: Path, key: str, *, progress: Progress | None = None) -> ObjectRef:
        """Copy the local file ``path`` to ``key``: temp file, fsync, rename."""
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # the caller's file: OSError as is
        try:
            return await self.upload_fd(src, key, progress=progress)
        finally:
            os.close(src)

    async def upload_fd(self, fd: int, key: str, *, progress: Progress | None = None) -> ObjectRef:
        """``upload`` of the file open as ``fd``."""
        dest = await asyncio.to_thread(self._checked, key)
        tracker = _PartProgress(progress)
        size = os.fstat(fd).st_size
        await self._retried("write", key, lambda: self._write(key, dest, fd, size, tracker))
        return await self.head(key)

    async def _write(
        self, key: str, dest: Path, src: int, size: int, tracker: _PartProgress
    ) -> None:
        fd, tmp = await self._fs("create", key, lambda: _open_temp(dest))
        try:
            got = await _copy_loop(
                lambda n, off: asyncio.to_thread(os.pread, src, n, off),
                lambda data, off: self._fs("write", key, lambda: _pwrite_all(fd, data, off, ())),
                size,
                lambda done: tracker.update(0, done),
            )
            if got != size:
                raise OSError(errno.EIO, f"the source shrank while uploading it ({got}/{size})")
        except BaseException:
            _abandon_temp(fd, tmp)
            raise
        await self._fs("write", key, lambda: _finish_temp(fd, tmp, dest))

    async def copy(self, src_key: str, dst_key: str) -> None:
        """Copy one file to another path under root (in the kernel), then rename into place."""
        src = await asyncio.to_thread(self._checked, src_key)
        dest = await asyncio.to_thread(self._checked, dst_key)
        await self._retried(
            "copy", src_key, lambda: self._fs("copy", src_key, lambda: _copy_file(src, dest))
        )

    async def delete(self, key: str) -> None:
        """Unlink the file; a missing one is fine."""
        real = await asyncio.to_thread(self._checked, key)
        await self._retried("delete", key, lambda: self._fs("delete", key, lambda: _unlink(real)))


def _take(items: Iterator[T], count: int) -> Sequence[T]:
    """The next ``count`` items (fewer at the end, none when exhausted)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= count:
            break
    return batch


async def _copy_loop(
    read: Callable[[int, int], Awaitable[bytes]],
    write: Callable[[bytes, int], Awaitable[None]],
    size: int,
    on_done: Callable[[int], None],
) -> int:
    """Copy ``size`` bytes chunk by chunk through ``read``/``write``; return the count copied."""
    offset = 0
    while offset < size:
        data = await read(min(_FILE_CHUNK, size - offset), offset)
        if not data:
            break
        await write(data, offset)
        offset += len(data)
        on_done(offset)
    return offset


def _open_temp(dest: Path) -> tuple[int, Path]:
    """A fresh temp file beside ``dest`` (same directory, so the rename is atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.hpcstage-tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(tmp, flags, 0o644), tmp


def _finish_temp(fd: int, tmp: Path, dest: Path) -> None:
    """fsync and close ``fd``, rename over ``dest``, fsync the directory; else remove ``tmp``."""
    try:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
        dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        _unlink(tmp)
        raise


def _abandon_temp(fd: int, tmp: Path) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        tmp.unlink()


def _copy_file(src: Path, dest: Path) -> None:
    fd, tmp = _open_temp(dest)
    try:
        source = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _sendfile_all(source, fd)
        finally:
            os.close(source)
    except BaseException:
        _abandon_temp(fd, tmp)
        raise
    _finish_temp(fd, tmp, dest)


def _sendfile_all(src: int, dst: int) -> None:
    # In-kernel copy: the bytes never enter Python (shutil.copyfile does the same on Linux).
    while os.sendfile(dst, src, None, _FILE_CHUNK):
        pass


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

"""Downloads from one S3 bucket into files, by one of four strategies (``Strategy``): the lean
GET of a small object, one SDK GET streamed into the file, or parallel ranged GETs whose parts
are either checked as they arrive or read back and hashed in file order.

Parts go first through the lean ranged GET (hpcstage.store.ranged) in worker threads, and
through the SDK when it hands one back. What is verified, and how, is hpcstage.store.verify's;
the contract is hpcstage.store.protocol's.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from hpcstage.core.identity import ObjectRef
from hpcstage.errors import ObjectChangedError, StoreError, TransientStoreError
from hpcstage.store import checksums
from hpcstage.store.checksums import StoreChecksum
from hpcstage.store.lean import LeanGet
from hpcstage.store.lean_client import Endpoint, LeanStats
from hpcstage.store.libc import DIRECT_ALIGN, DIRECT_UNSUPPORTED, PartSink, open_direct, preallocate
from hpcstage.store.parts import (
    READ_BACK_PARTS,
    InOrderHash,
    Part,
    PartProgress,
    pwrite_hashed,
    run_bounded,
    split_parts,
)
from hpcstage.store.protocol import LEAN_MAX, MIB, DownloadResult, Progress
from hpcstage.store.ranged import RangeAbort, RangeGet
from hpcstage.store.s3_bucket import BucketSettings, S3Bucket
from hpcstage.store.s3_errors import VENDOR_ERRORS, translate_s3_error
from hpcstage.store.sigv4 import SigV4
from hpcstage.store.throttle import Throttle
from hpcstage.store.verify import PLAIN_MD5, Checks, etag_is_md5, md5_contradicts

if TYPE_CHECKING:
    from aiobotocore.response import StreamingBody

log = logging.getLogger(__name__)

_STREAM_CHUNK: Final = 1 * MIB  # bytes buffered per connection before one pwrite
_INLINE_WRITE: Final = 64 * 1024  # bodies up to this size are written on the event loop
_PROXY_VARIABLES: Final = ("http_proxy", "https_proxy", "all_proxy")


class Strategy(enum.Enum):
    """How one object is fetched (chosen by ``choose_strategy``)."""

    LEAN = "lean"  # one lean GET into memory; the SDK's whole GET if it hands the object back
    WHOLE = "whole"  # one SDK GET streamed into the file
    PARTS_CHECKED = "parts-checked"  # ranged GETs, each part checksummed as its bytes arrive
    PARTS_READ_BACK = "parts-read-back"  # ranged GETs, read back and hashed in file order


def pinned(ref: ObjectRef) -> dict[str, Any]:
    """The VersionId argument of a request for ``ref`` (none unless its version is pinned)."""
    return {"VersionId": ref.version_id} if ref.version_id else {}


def choose_strategy(size: int, *, threshold: int, lean: bool, in_order: bool) -> Strategy:
    """How to fetch an object of ``size`` bytes.

    ``threshold``: the store's multipart threshold; ``lean``: the lean GET is on for the
    store; ``in_order``: the object's checks must see its bytes in file order (an MD5, a SHA,
    or a store checksum that cannot be combined from parts: ``Checks.in_order``).
    """
    if size < threshold:
        return Strategy.LEAN if lean and size <= LEAN_MAX else Strategy.WHOLE
    return Strategy.PARTS_READ_BACK if in_order else Strategy.PARTS_CHECKED


@dataclass
class WriteStats:
    """How big downloads reached the disk and were checked (for tests and the benchmark)."""

    direct_bytes: int = 0  # written with O_DIRECT
    checked_inline: int = 0  # multipart downloads checksummed part by part as bytes arrived
    read_back: int = 0  # multipart downloads read back from the page cache to be checked
    direct_refused: str = ""  # why O_DIRECT was given up on this store ("": it was not)


@dataclass(frozen=True)
class LeanBody:
    """A small object fetched by the lean GET, checked against its ETag where that is an MD5."""

    body: bytes
    sha256_hex: str
    md5_hex: str  # "" unless the ETag is a plain MD5


@dataclass(frozen=True)
class LeanClients:
    """The lean GET clients of one bucket: whole small objects, and parts of big ones."""

    whole: LeanGet
    ranged: RangeGet


@dataclass(frozen=True)
class _PartsPlan:
    """How the parts of one multipart download are fetched."""

    read_back: Sequence[Any]  # hashers fed in file order from the page cache ([]: none)
    in_flight: int  # parts fetched at once (also bounded by max_connections)
    direct: bool  # parts the lean ranged GET fetches may be written with O_DIRECT


def make_lean(settings: BucketSettings, throttle: Throttle | None = None) -> LeanClients | None:
    """The lean GET clients for the bucket of ``settings`` (whole small objects, parts of big
    ones), or None where the SDK must do every request.

    The SDK keeps: credential chains (only explicit keys are signed here), proxies, and the
    ``auto`` addressing style; ``Endpoint.for_bucket`` refuses what it does not handle.
    """
    credentials = settings.credentials
    if credentials is None or not credentials.get("access_key"):
        return None
    if any(os.environ.get(v) or os.environ.get(v.upper()) for v in _PROXY_VARIABLES):
        return None
    try:
        endpoint = Endpoint.for_bucket(
            settings.store_id, settings.bucket, settings.addressing_style
        )
    except ValueError:
        return None
    context = None
    if endpoint.tls:
        cafile = str(settings.ca_bundle or os.environ.get("AWS_CA_BUNDLE") or "") or None
        if cafile is None:
            from botocore.httpsession import get_cert_path

            cafile = str(get_cert_path(True))
        context = ssl.create_default_context(cafile=cafile)
        if not settings.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    signer = SigV4(
        credentials["access_key"],
        credentials.get("secret_key", ""),
        credentials.get("token") or "",
        settings.region,
    )
    options: dict[str, Any] = {
        "ssl_context": context,
        "connect_timeout": settings.connect_timeout,
        "read_timeout": settings.read_timeout,
        "max_idle": settings.max_connections,
        "throttle": throttle,
    }
    return LeanClients(LeanGet(endpoint, signer, **options), RangeGet(endpoint, signer, **options))


async def _write_body(fd: int, body: bytes) -> None:
    if len(body) <= _INLINE_WRITE:
        pwrite_hashed(fd, body, 0, ())  # a few KiB into the page cache: no thread hop
    else:
        await asyncio.to_thread(pwrite_hashed, fd, body, 0, ())


class S3Downloader:
    """Fetches objects of one bucket into open files, each by the strategy its size and
    checks call for (``choose_strategy``), verified as the contract says.

    Objects of at least ``threshold`` bytes move in ``part_size`` parts, in parallel, at most
    ``max_connections`` at a time. Parts fetched by the lean ranged GET and checked part by
    part are written with O_DIRECT where the file system allows it (``direct_writes``; see
    ``hpcstage.store.libc.PartSink``).
    """

    def __init__(
        self,
        bucket: S3Bucket,
        settings: BucketSettings,
        *,
        part_size: int,
        threshold: int,
        lean_get: bool,
        direct_writes: bool,
        writeback_hints: bool = True,
        throttle: Throttle | None = None,
    ) -> None:
        self._bucket = bucket
        self._throttle = throttle or Throttle()
        self._writeback = writeback_hints
        self._part_size = part_size
        self._threshold = threshold
        self._max_connections = settings.max_connections
        self._direct = direct_writes
        self._opaque_etags = False  # an object's MD5-looking ETag was none (SSE-KMS, SSE-C)
        self._range_threads: ThreadPoolExecutor | None = None
        self.write_stats = WriteStats()
        lean = make_lean(settings, self._throttle) if lean_get else None
        self._lean: LeanGet | None = lean.whole if lean is not None else None
        self._ranged: RangeGet | None = lean.ranged if lean is not None else None

    @property
    def lean_stats(self) -> LeanStats | None:
        """What the lean GET path served and handed back (None when it is not used)."""
        return self._lean.stats if self._lean is not None else None

    @property
    def ranged_stats(self) -> LeanStats | None:
        """What the lean ranged GET of big objects' parts served and handed back."""
        return self._ranged.stats if self._ranged is not None else None

    async def close(self) -> None:
        """Close the lean clients' connections and the ranged GET's threads."""
        if self._lean is not None:
            await self._lean.close()
        if self._range_threads is not None:
            self._range_threads.shutdown(wait=False)
            self._range_threads = None
        if self._ranged is not None:
            self._ranged.close()

    async def download(
        self, ref: ObjectRef, dest_fd: int, *, progress: Progress | None = None
    ) -> DownloadResult:
        """Fetch ``ref`` into ``dest_fd`` (see ``S3Store.download``)."""
        self._check_owns(ref)
        stored, md5_etag = await self._head_checks(ref) if ref.size > LEAN_MAX else (None, True)
        checks = Checks.choose(ref, stored, md5_etag)
        lean = self._lean is not None and not self._opaque_etags
        strategy = choose_strategy(
            ref.size, threshold=self._threshold, lean=lean, in_order=checks.in_order
        )
        if ref.version_id:
            # A pinned version goes through the SDK only (one GET naming its VersionId): the
            # lean and ranged GETs ask for the current object.
            strategy = Strategy.WHOLE
        if strategy is Strategy.LEAN:
            result = await self._download_lean(ref, dest_fd, progress)
            if result is not None:
                return result
            strategy = Strategy.WHOLE  # handed back: the SDK fetches it
        if strategy is Strategy.WHOLE:
            return await self._download_whole(ref, dest_fd, progress, stored)
        parts = split_parts(ref.size, self._part_size)
        if strategy is Strategy.PARTS_CHECKED:
            return await self._download_parts_checked(ref, dest_fd, progress, checks, parts)
        return await self._download_parts_read_back(ref, dest_fd, progress, checks, parts)

    async def _download_lean(
        self, ref: ObjectRef, fd: int, progress: Progress | None
    ) -> DownloadResult | None:
        """A small object through the lean GET, written in one go; None: it was handed back."""
        lean = await self.lean_bytes(ref)
        if lean is None:
            return None
        await _write_body(fd, lean.body)
        PartProgress(progress).update(0, len(lean.body))
        return DownloadResult(lean.sha256_hex, len(lean.body), "md5" if lean.md5_hex else "")

    async def _download_whole(
        self, ref: ObjectRef, fd: int, progress: Progress | None, stored: StoreChecksum | None
    ) -> DownloadResult:
        """One SDK GET streamed into ``fd``; retried whole, a checksum mismatch included."""
        tracker = PartProgress(progress)
        return await self._bucket.retried(
            "get", ref.key, lambda: self._get_whole(ref, fd, tracker, stored)
        )

    async def _download_parts_checked(
        self,
        ref: ObjectRef,
        fd: int,
        progress: Progress | None,
        checks: Checks,
        parts: Sequence[Part],
    ) -> DownloadResult:
        """Ranged GETs, all in flight, each part checksummed as its bytes arrive (a CRC the
        store keeps, combined from the parts', or nothing to compute): nothing is read back,
        and the lean ranged GET may write the parts with O_DIRECT."""
        checks.check_by_parts(parts)
        # Only writeback hints are left to do in part order (the SDK's fallback path does not
        # give them as it writes).
        plan = _PartsPlan([], len(parts), direct=True)
        await self._fetch_parts(ref, fd, progress, checks, parts, plan)
        self.write_stats.checked_inline += 1
        return checks.verify(self._bucket.url(ref.key))

    async def _download_parts_read_back(
        self,
        ref: ObjectRef,
        fd: int,
        progress: Progress | None,
        checks: Checks,
        parts: Sequence[Part],
    ) -> DownloadResult:
        """Ranged GETs whose bytes an MD5 or a SHA must see in order: read back from the page
        cache and hashed in file order as the parts land. A mismatch raises
        TransientStoreError at once (which part was bad is unknown; the caller fetches the
        object again)."""
        hashers = checks.hashers()
        # Parts started in order and a few at a time land in order, so the hashing follows
        # the download closely instead of starting when the last part lands.
        in_flight = min(len(parts), READ_BACK_PARTS) if hashers else len(parts)
        plan = _PartsPlan(hashers, in_flight, direct=False)
        await self._fetch_parts(ref, fd, progress, checks, parts, plan)
        self.write_stats.read_back += 1
        return checks.verify(self._bucket.url(ref.key))

    async def _fetch_parts(
        self,
        ref: ObjectRef,
        fd: int,
        progress: Progress | None,
        checks: Checks,
        parts: Sequence[Part],
        plan: _PartsPlan,
    ) -> None:
        """Fetch every part into ``fd`` by ``plan``, in blocks reserved first."""
        hasher = InOrderHash(fd, parts, plan.read_back, self._writeback)
        tracker = PartProgress(progress, hasher.landed, hasher.restart)
        await asyncio.to_thread(preallocate, fd, ref.size)  # no room: fail before any GET
        direct_fd = self._open_direct(fd, parts) if plan.direct else -1
        try:
            await self._get_parts(
                ref, parts, tracker, hasher.part_done, checks, (fd, direct_fd), plan.in_flight
            )
            await hasher.finish(self._bucket.url(ref.key))
        finally:
            await hasher.cancel()
            if direct_fd >= 0:
                os.close(direct_fd)

    def _open_direct(self, fd: int, parts: Sequence[Part]) -> int:
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
        answer = await self._bucket.call(
            "head",
            ref.key,
            lambda c: c.head_object(
                Bucket=self._bucket.name, Key=ref.key, ChecksumMode="ENABLED", **pinned(ref)
            ),
        )
        self._bucket.check_same(ref, answer.get("ETag"))
        if answer.get("ContentLength") != ref.size:
            raise ObjectChangedError(
                f"head {self._bucket.url(ref.key)}: the object changed since it was listed"
                f" ({answer.get('ContentLength')} bytes, listed with {ref.size})"
            )
        return checksums.from_response(answer), self._md5_etag(ref, answer)

    def _md5_etag(self, ref: ObjectRef, answer: Mapping[str, Any]) -> bool:
        """``etag_is_md5`` of an answer about ``ref``; an MD5-looking ETag that is none (SSE)
        turns the lean GET off for this store: it could only check such objects by their
        ETag, fail, and fall back to the SDK every time."""
        md5 = etag_is_md5(ref.etag, answer)
        if not md5 and PLAIN_MD5.fullmatch(ref.etag) and not self._opaque_etags:
            self._opaque_etags = True
            log.info(
                "%s: encrypted objects (SSE-KMS/SSE-C): their ETags are no MD5",
                self._bucket.url(""),
            )
        return md5

    def _check_owns(self, ref: ObjectRef) -> None:
        if (ref.store, ref.bucket) != (self._bucket.store_id, self._bucket.name):
            raise ValueError(
                f"{ref} does not belong to {self._bucket.store_id} bucket {self._bucket.name}"
            )

    async def lean_bytes(self, ref: ObjectRef) -> LeanBody | None:
        """A small object's bytes and checksums through the lean GET (hpcstage.store.lean), or
        None when it does not apply or falls back: then the SDK path must fetch it."""
        lean = self._lean
        if lean is None or ref.size > LEAN_MAX or ref.size >= self._threshold or ref.version_id:
            return None
        if self._opaque_etags:
            return None
        self._check_owns(ref)
        body = await lean.get(ref.key, ref.size, ref.etag)
        if body is None:
            return None
        md5 = ""
        if PLAIN_MD5.fullmatch(ref.etag):
            md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
            if md5_contradicts(ref.etag, md5):
                return None  # the SDK path fetches again, verifies and retries or reports
        return LeanBody(body, hashlib.sha256(body).hexdigest(), md5)

    async def _get_whole(
        self, ref: ObjectRef, fd: int, tracker: PartProgress, stored: StoreChecksum | None
    ) -> DownloadResult:
        answer = await self._bucket.request(
            "get",
            ref.key,
            lambda c: c.get_object(Bucket=self._bucket.name, Key=ref.key, **pinned(ref)),
        )
        checks = Checks.choose(ref, stored, self._md5_etag(ref, answer))
        async with answer["Body"] as body:  # released to the pool whatever happens
            self._bucket.check_same(ref, answer.get("ETag"))
            self._check_announced(ref, answer.get("ContentLength"))
            got = await self._stream(ref.key, body, fd, 0, checks.hashers(), 0, tracker, ref.size)
        self._check_count(ref.key, got, ref.size)
        return checks.verify(self._bucket.url(ref.key))

    async def _get_parts(
        self,
        ref: ObjectRef,
        parts: Sequence[Part],
        tracker: PartProgress,
        done: Callable[[Part], None],
        checks: Checks,
        fds: tuple[int, int],
        in_flight: int,
    ) -> None:
        """Fetch ``parts`` into ``fds = (fd, direct_fd)`` (direct_fd: -1 or ``fd``'s file
        opened O_DIRECT), each checksummed by ``checks.part`` when checked part by part, at
        most ``in_flight`` (and ``max_connections``) at a time."""
        fd, direct_fd = fds

        async def one(part: Part) -> None:
            sink = PartSink(fd, direct_fd, checks.part(part), self._writeback)
            if not await self._lean_range(ref, sink, part, tracker):
                await self._bucket.retried(
                    "get", ref.key, lambda: self._get_range(ref, fd, part, tracker, checks)
                )
            done(part)

        await run_bounded(parts, one, min(self._max_connections, in_flight))

    async def _lean_range(
        self, ref: ObjectRef, sink: PartSink, part: Part, tracker: PartProgress
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
        self, ref: ObjectRef, fd: int, part: Part, tracker: PartProgress, checks: Checks
    ) -> None:
        last = part.offset + part.length - 1
        answer = await self._bucket.request(
            "get",
            ref.key,
            lambda c: c.get_object(
                Bucket=self._bucket.name,
                Key=ref.key,
                Range=f"bytes={part.offset}-{last}",
                **pinned(ref),
            ),
        )
        async with answer["Body"] as body:
            self._bucket.check_same(ref, answer.get("ETag"))
            if answer.get("ContentLength") != part.length:
                raise StoreError(f"get {self._bucket.url(ref.key)}: the store ignored a ranged GET")
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
        tracker: PartProgress,
        expected: int,
    ) -> int:
        """Copy a response body into ``fd`` at ``offset`` in 1 MiB writes; return the count.

        A body longer than ``expected`` is refused before its excess is written: a broken or
        hostile server must not fill the node's disk through one small listed object.
        """
        written = 0
        while chunk := await self._read_chunk(key, body):
            self._check_count(key, written + len(chunk), expected, at_most=True)
            await self._throttle.download.take(len(chunk))  # the next read waits for these
            # pwrite and hashing run in a thread: hashlib releases the GIL, the loop stays free.
            await asyncio.to_thread(pwrite_hashed, fd, chunk, offset + written, hashers)
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
        except VENDOR_ERRORS as exc:
            raise translate_s3_error(exc, f"get {self._bucket.url(key)}") from exc
        return buffer

    def _check_announced(self, ref: ObjectRef, announced: object) -> None:
        """A whole GET's Content-Length must be the listed size (before any byte is read)."""
        if not isinstance(announced, int) or announced == ref.size:
            return  # no Content-Length: the byte count of the body decides
        what = "truncated: " if announced < ref.size else ""
        raise TransientStoreError(
            f"get {self._bucket.url(ref.key)}: {what}the store announced {announced} bytes"
            f" (Content-Length) for an object listed with {ref.size}"
        )

    def _check_count(self, key: str, got: int, expected: int, at_most: bool = False) -> None:
        """``got`` bytes must be ``expected`` (with ``at_most``: must not exceed it)."""
        if got > expected:
            raise TransientStoreError(
                f"get {self._bucket.url(key)}: the store sent more than the {expected} bytes listed"
            )
        if got < expected and not at_most:
            raise TransientStoreError(
                f"get {self._bucket.url(key)}: truncated: got {got} of {expected} bytes"
            )

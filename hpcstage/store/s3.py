"""The S3 store: one bucket through aiobotocore, behind the object-store contract
(hpcstage.store.protocol), with the lean GETs (hpcstage.store.lean, hpcstage.store.ranged) in
front of the SDK where they apply."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Final, Self, TypeVar, cast

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession

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
from hpcstage.store.protocol import (
    GIB,
    LEAN_MAX,
    MIB,
    Described,
    DownloadResult,
    ObjectStore,
    Precondition,
    Progress,
    UploadLog,
)
from hpcstage.store.ranged import RangeAbort, RangeGet
from hpcstage.store.s3_errors import (
    MALFORMED,
    VENDOR_ERRORS,
    error_code,
    malformed_response,
    shown,
    translate_s3_error,
)
from hpcstage.store.sigv4 import SigV4
from hpcstage.store.upload_bodies import FileRange, MemoryBudget, md5_of_range, read_with_md5
from hpcstage.store.verify import PLAIN_MD5, Checks, check_md5, etag_is_md5, md5_contradicts

if TYPE_CHECKING:
    from aiobotocore.response import StreamingBody
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

T = TypeVar("T")

S3_MIN_PART: Final = 5 * MIB  # S3 refuses smaller parts (except the last)

S3_MAX_COPY: Final = 5 * GIB  # CopyObject's limit; larger objects are copied in parts

_STREAM_CHUNK: Final = 1 * MIB  # bytes buffered per connection before one pwrite

_INLINE_WRITE: Final = 64 * 1024  # bodies up to this size are written on the event loop

_PROXY_VARIABLES: Final = ("http_proxy", "https_proxy", "all_proxy")

_ADDRESSING_STYLES: Final = ("path", "virtual", "auto")

SHA256_METADATA: Final = "hpcstage-sha256"  # x-amz-meta-hpcstage-sha256, set on upload

_NO_ETAG: Final = Precondition("0" * 32)  # an ETag no object has: If-Match must fail


@dataclass
class WriteStats:
    """How big downloads reached the disk and were checked (for tests and the benchmark)."""

    direct_bytes: int = 0  # written with O_DIRECT
    checked_inline: int = 0  # multipart downloads checksummed part by part as bytes arrived
    read_back: int = 0  # multipart downloads read back from the page cache to be checked
    direct_refused: str = ""  # why O_DIRECT was given up on this store ("": it was not)


async def _write_body(fd: int, body: bytes) -> None:
    if len(body) <= _INLINE_WRITE:
        pwrite_hashed(fd, body, 0, ())  # a few KiB into the page cache: no thread hop
    else:
        await asyncio.to_thread(pwrite_hashed, fd, body, 0, ())


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
        self._budget = MemoryBudget(upload_memory)
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
        except VENDOR_ERRORS as exc:
            raise translate_s3_error(exc, f"{op} {self.url(key)}") from exc
        try:
            return await fn(client)
        except VENDOR_ERRORS as exc:
            raise translate_s3_error(exc, f"{op} {self.url(key)}") from exc
        except MALFORMED as exc:
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
            PartProgress(progress).update(0, len(body))
            return DownloadResult(sha256_hex, len(body), "md5" if md5_hex else "")
        stored, md5_etag = await self._head_checks(ref) if ref.size > LEAN_MAX else (None, True)
        if ref.size < self._threshold:
            tracker = PartProgress(progress)
            return await self._retried(
                "get", ref.key, lambda: self._get_whole(ref, dest_fd, tracker, stored)
            )
        parts = split_parts(ref.size, self._part_size)
        checks = Checks.choose(ref, stored, md5_etag)
        by_parts = checks.by_parts(parts)
        # Only writeback hints are left to do in part order when the parts are checked as
        # they arrive (the SDK's fallback path does not give them as it writes).
        read_back = [] if by_parts else checks.hashers()
        hasher = InOrderHash(dest_fd, parts, read_back)
        # Read back and hashed in order: parts started in order and a few at a time land in
        # order, so the hashing follows the download closely instead of starting when the
        # last part lands.
        in_flight = min(len(parts), READ_BACK_PARTS) if read_back else len(parts)
        tracker = PartProgress(progress, hasher.landed, hasher.restart)
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
        if not md5 and PLAIN_MD5.fullmatch(ref.etag) and not self._opaque_etags:
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
        if PLAIN_MD5.fullmatch(ref.etag):
            md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
            if md5_contradicts(ref.etag, md5):
                return None  # the SDK path fetches again, verifies and retries or reports
        return body, hashlib.sha256(body).hexdigest(), md5

    async def _get_whole(
        self, ref: ObjectRef, fd: int, tracker: PartProgress, stored: StoreChecksum | None
    ) -> DownloadResult:
        answer = await self._request(
            "get", ref.key, lambda c: c.get_object(Bucket=self.bucket, Key=ref.key)
        )
        checks = Checks.choose(ref, stored, self._md5_etag(ref, answer))
        async with answer["Body"] as body:  # released to the pool whatever happens
            self._check_same(ref, answer.get("ETag"))
            self._check_announced(ref, answer.get("ContentLength"))
            got = await self._stream(ref.key, body, fd, 0, checks.hashers(), 0, tracker, ref.size)
        self._check_count(ref.key, got, ref.size)
        return checks.verify(self.url(ref.key))

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
            sink = PartSink(fd, direct_fd, checks.part(part))
            if not await self._lean_range(ref, sink, part, tracker):
                await self._retried(
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
        tracker = PartProgress(progress)
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
        tracker: PartProgress,
        only_if: Precondition | None,
        meta: dict[str, str],
    ) -> str:
        async with self._budget.reserve(size):
            data, md5 = await asyncio.to_thread(read_with_md5, fd, 0, size)
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
            if "IfMatch" in condition and error_code(exc) == "NoSuchKey":
                # If-Match on a key deleted meanwhile: it changed, it is not a missing bucket.
                raise ObjectChangedError(f"put {self.url(key)}: the object was deleted") from exc
            raise
        etag = _etag(answer.get("ETag"))
        if etag_is_md5(etag, answer):  # else the server checked the body by its Content-MD5
            check_md5(self.url(key), etag, md5.hex())
        return etag

    async def _put_parts(
        self,
        fd: int,
        key: str,
        size: int,
        tracker: PartProgress,
        only_if: Precondition | None,
        journal: UploadLog | None,
        meta: dict[str, str],
    ) -> None:
        async def send(upload_id: str, part: Part) -> str:
            # Streamed from the file, never held whole: a part of a 100 TiB file is 10 GiB.
            md5 = await asyncio.to_thread(md5_of_range, fd, part.offset, part.length)
            etag = await self._retried(
                "put part", key, lambda: self._put_part_once(key, upload_id, part, fd, md5)
            )
            tracker.update(part.number, part.length)
            return etag

        await self._multipart(key, split_parts(size, self._part_size), send, only_if, journal, meta)

    async def _put_part_once(
        self, key: str, upload_id: str, part: Part, fd: int, md5: bytes
    ) -> str:
        answer = await self._request(
            "put part",
            key,
            lambda c: c.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=part.number,
                Body=cast("IO[bytes]", FileRange(fd, part.offset, part.length)),
                ContentLength=part.length,
                ContentMD5=base64.b64encode(md5).decode(),
            ),
        )
        etag = str(answer.get("ETag", ""))
        if etag_is_md5(_etag(etag), answer):  # under SSE-KMS/SSE-C the Content-MD5 is the check
            check_md5(self.url(key), _etag(etag), md5.hex())
        return etag

    async def _multipart(
        self,
        key: str,
        parts: Sequence[Part],
        send: Callable[[str, Part], Awaitable[str]],
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

        async def one(part: Part) -> None:
            etags[part.number] = await send(upload_id, part)

        try:
            await run_bounded(parts, one, min(self._max_connections, len(parts)))
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
            if not condition or error_code(exc) != "NotImplemented":
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
        async def send(upload_id: str, part: Part) -> str:
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
        await self._multipart(dst_key, split_parts(source.size, max(self._part_size, GIB)), send)

    async def head_or_none(self, key: str) -> ObjectRef | None:
        """The object's identity, or None when there is no object at ``key``."""
        try:
            return await self.head(key)
        except ObjectMissingError:
            return None

    async def delete(self, key: str) -> None:
        """DeleteObject (S3 answers success for a missing key too)."""
        await self._call("delete", key, lambda c: c.delete_object(Bucket=self.bucket, Key=key))

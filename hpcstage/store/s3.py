"""The S3 store: one bucket through aiobotocore, behind the object-store contract
(hpcstage.store.protocol), with the lean GETs (hpcstage.store.lean, hpcstage.store.ranged) in
front of the SDK where they apply.

A little over 600 lines, on purpose: the writes left here (single PUT, multipart upload,
conditional writes and their probe, server-side copy) share the multipart steps and the
conditional-write state, and the stage-out contract tests override single steps of them in
subclasses (a failed Complete, an abort that never happens). Requests (s3_bucket.py) and
downloads (s3_download.py) are modules of their own.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Final, Self, cast

from hpcstage.core.identity import ObjectRef
from hpcstage.errors import (
    CredentialError,
    ObjectChangedError,
    ObjectMissingError,
    StoreError,
    TransientStoreError,
)
from hpcstage.retry import DEFAULT_RETRY, OnRetry, RetryPolicy
from hpcstage.store.checksums import StoreChecksum
from hpcstage.store.lean_client import LeanStats
from hpcstage.store.parts import Part, PartProgress, run_bounded, split_parts
from hpcstage.store.protocol import (
    GIB,
    MIB,
    Described,
    DownloadResult,
    ObjectStore,
    Precondition,
    Progress,
    UploadOptions,
)
from hpcstage.store.s3_bucket import ADDRESSING_STYLES, BucketSettings, S3Bucket, unquoted_etag
from hpcstage.store.s3_download import LeanBody, S3Downloader, WriteStats, pinned
from hpcstage.store.s3_errors import error_code, shown
from hpcstage.store.throttle import Throttle
from hpcstage.store.upload_bodies import FileRange, MemoryBudget, md5_of_range, read_with_md5
from hpcstage.store.verify import check_md5, etag_is_md5

if TYPE_CHECKING:
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

S3_MIN_PART: Final = 5 * MIB  # S3 refuses smaller parts (except the last)
S3_MAX_COPY: Final = 5 * GIB  # CopyObject's limit; larger objects are copied in parts
SHA256_METADATA: Final = "hpcstage-sha256"  # x-amz-meta-hpcstage-sha256, set on upload
_NO_ETAG: Final = Precondition("0" * 32)  # an ETag no object has: If-Match must fail


async def download_bytes(store: ObjectStore, ref: ObjectRef) -> tuple[bytes, str]:
    """A small object's bytes and their SHA-256, verified as ``download`` verifies.

    S3 objects come through the lean GET when it applies; otherwise the store's ``download``
    writes into an anonymous memory file (memfd), never into the cache directory.
    """
    if isinstance(store, S3Store):
        lean = await store.lean_bytes(ref)
        if lean is not None:
            return lean.body, lean.sha256_hex
    fd = os.memfd_create("hpcstage-object", os.MFD_CLOEXEC)
    try:
        result = await store.download(ref, fd)
        body = os.pread(fd, ref.size, 0) if ref.size else b""
    finally:
        os.close(fd)
    return body, result.sha256_hex


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


PLAIN_UPLOAD: Final = UploadOptions()  # unconditional, unjournaled, no SHA-256 recorded


def _metadata(options: UploadOptions) -> dict[str, str]:
    """The object's user metadata: the file's SHA-256, when the caller gave it."""
    return {SHA256_METADATA: options.sha256} if options.sha256 else {}


class S3Store:
    """An S3 bucket behind the object-store contract: listing, HEADs and writes here,
    downloads by an ``S3Downloader``, every request through one ``S3Bucket`` client (and its
    connection pool) per store instance.

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
        writeback_hints: bool = True,
        throttle: Throttle | None = None,
    ) -> None:
        if part_size < S3_MIN_PART or max_connections < 1:
            raise ValueError("part_size must be at least 5 MiB and max_connections at least 1")
        if addressing_style not in ADDRESSING_STYLES:
            raise ValueError(f"addressing_style must be one of {ADDRESSING_STYLES}")
        settings = BucketSettings(
            endpoint_url,
            bucket,
            region=region,
            profile=profile,
            addressing_style=addressing_style,
            verify_tls=verify_tls,
            ca_bundle=ca_bundle,
            credentials=credentials,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_connections=max_connections,
        )
        self.bucket = bucket
        self.store_id = settings.store_id
        self._throttle = throttle or Throttle()
        self._bucket = S3Bucket(settings, retry, on_retry, self._throttle)
        self._downloader = S3Downloader(
            self._bucket,
            settings,
            part_size=part_size,
            threshold=multipart_threshold,
            lean_get=lean_get,
            direct_writes=direct_writes,
            writeback_hints=writeback_hints,
            throttle=self._throttle,
        )
        self._part_size = part_size
        self._threshold = multipart_threshold
        self._max_connections = max_connections
        self._page_size = list_page_size
        self._budget = MemoryBudget(upload_memory)
        self._probe_lock = asyncio.Lock()
        # Whether PutObject honours If-Match/If-None-Match (None: not probed yet; see
        # conditional_writes). rclone's server ignores both; AWS and moto honour them.
        self._conditional: bool | None = None
        self._conditional_complete = True  # False once Complete answered NotImplemented to it

    @property
    def lean_stats(self) -> LeanStats | None:
        """What the lean GET path served and handed back (None when it is not used)."""
        return self._downloader.lean_stats

    @property
    def ranged_stats(self) -> LeanStats | None:
        """What the lean ranged GET of big objects' parts served and handed back."""
        return self._downloader.ranged_stats

    @property
    def write_stats(self) -> WriteStats:
        """How big downloads reached the disk and were checked."""
        return self._downloader.write_stats

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
        await self._bucket.close()
        await self._downloader.close()

    def url(self, key: str) -> str:
        """``s3://bucket/key``, as messages name objects (control characters escaped)."""
        return self._bucket.url(key)

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
            page = await self._bucket.call("list", prefix, lambda c: c.list_objects_v2(**params))
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
                yield self._bucket.checked_ref(
                    where, key, item.get("ETag"), item.get("Size"), item.get("LastModified")
                )
            if not more:
                return
            params["ContinuationToken"] = token

    async def head(self, key: str, *, version_id: str = "") -> ObjectRef:
        """The object's identity from a HEAD request (with ``version_id``: that version's,
        which every later GET of the ref asks for)."""
        return (await self._head(key, version_id))[0]

    async def _head(self, key: str, version_id: str = "") -> tuple[ObjectRef, Mapping[str, Any]]:
        pin: dict[str, Any] = {"VersionId": version_id} if version_id else {}
        try:
            answer = await self._bucket.call(
                "head", key, lambda c: c.head_object(Bucket=self.bucket, Key=key, **pin)
            )
        except ObjectMissingError as exc:
            if not version_id:
                raise
            # A HEAD's 404 has no body to tell a missing version from a missing key; "no such
            # object" would mislead when the key holds other versions. Name the version.
            where = f"head {self.url(key)}?versionId={shown(version_id)}"
            raise ObjectMissingError(f"{where}: no such version") from exc
        ref = self._bucket.checked_ref(
            f"head {self.url(key)}",
            key,
            answer.get("ETag"),
            answer.get("ContentLength"),
            answer.get("LastModified"),
            version_id,
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
        (``direct_writes``; see ``hpcstage.store.libc.PartSink``). The strategies are
        ``hpcstage.store.s3_download``'s.
        """
        return await self._downloader.download(ref, dest_fd, progress=progress)

    async def read_range(self, ref: ObjectRef, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of ``ref`` in memory, with one ranged GET (retried);
        ObjectChangedError when the object is no longer ``ref``. For reads of part of an object
        (a packed dataset's manifest and members): the caller checks the content."""
        if length <= 0 or start < 0 or start + length > ref.size:
            raise ValueError(f"range {start}+{length} outside {self.url(ref.key)} ({ref.size} B)")

        async def once() -> bytes:
            answer = await self._bucket.request(
                "get",
                ref.key,
                lambda c: c.get_object(
                    Bucket=self.bucket,
                    Key=ref.key,
                    Range=f"bytes={start}-{start + length - 1}",
                    **pinned(ref),
                ),
            )
            async with answer["Body"] as body:
                self._bucket.check_same(ref, answer.get("ETag"))
                data = bytes(await body.read())
            await self._throttle.download.take(len(data))
            if len(data) != length:
                raise TransientStoreError(
                    f"get {self.url(ref.key)}: asked for {length} bytes at {start}, got {len(data)}"
                )
            return data

        return await self._bucket.retried("get", ref.key, once)

    async def lean_bytes(self, ref: ObjectRef) -> LeanBody | None:
        """A small object's bytes and checksums through the lean GET (hpcstage.store.lean), or
        None when it does not apply or falls back: then the SDK path must fetch it."""
        return await self._downloader.lean_bytes(ref)

    async def stored_checksum(self, ref: ObjectRef) -> StoreChecksum | None:
        """The full-object checksum the store keeps for ``ref``'s version, if any (one HEAD).

        ObjectChangedError when the object is no longer the one listed (its checksum would
        describe other bytes)."""
        return await self._downloader.stored_checksum(ref)

    # -- upload --------------------------------------------------------------------------------

    async def upload(
        self,
        path: Path,
        key: str,
        *,
        progress: Progress | None = None,
        options: UploadOptions = PLAIN_UPLOAD,
    ) -> ObjectRef:
        """PUT ``path`` as ``key`` (multipart for big files; aborted on any failure).

        ``options.sha256`` (the file's, if the caller computed it) is kept in the object's
        metadata (``SHA256_METADATA``): where the ETag is no MD5 (multipart, SSE-KMS, SSE-C) it
        is what tells a later stage-out that the object already holds the file.

        ``options.only_if``: write only if ``key`` still holds what the caller saw, else raise
        ObjectChangedError and write nothing. Where the store honours conditional writes (see
        ``conditional_writes``) the PUT (or CompleteMultipartUpload) carries If-Match or
        If-None-Match: * and the store decides atomically. Elsewhere, and for every multipart
        upload (some servers ignore the condition on Complete), the key is HEADed again right
        before the write: that leaves a race of one round trip, not of the whole upload.
        ``options.journal`` hears of every multipart upload opened and ended.
        """
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return await self.upload_fd(fd, key, progress=progress, options=options)
        finally:
            os.close(fd)

    async def upload_fd(
        self,
        fd: int,
        key: str,
        *,
        progress: Progress | None = None,
        options: UploadOptions = PLAIN_UPLOAD,
    ) -> ObjectRef:
        """``upload`` of the file open as ``fd``: the bytes of that file, whatever its path
        names by now (stage-out checks a file on its fd, then uploads from it)."""
        size = os.fstat(fd).st_size
        tracker = PartProgress(progress)
        if size < self._threshold:
            etag = await self._put_whole(fd, key, size, tracker, options)
            return self._bucket.ref(key, etag, size)
        await self._put_parts(fd, key, size, tracker, options)
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
        options: UploadOptions,
    ) -> str:
        only_if, meta = options.only_if, _metadata(options)
        async with self._budget.reserve(size):
            data, md5 = await asyncio.to_thread(read_with_md5, fd, 0, size)
            if only_if is not None and not self._conditional:
                await self._check_precondition(key, only_if)
            answer = await self._bucket.retried(
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
            # Uploads are paced per object or part, before each attempt sends it (botocore
            # reads a body once to sign it and again to send it: its reads cannot be paced).
            await self._throttle.upload.take(len(data))
            answer = await self._bucket.request(
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
        etag = unquoted_etag(answer.get("ETag"))
        if etag_is_md5(etag, answer):  # else the server checked the body by its Content-MD5
            check_md5(self.url(key), etag, md5.hex())
        return etag

    async def _put_parts(
        self,
        fd: int,
        key: str,
        size: int,
        tracker: PartProgress,
        options: UploadOptions,
    ) -> None:
        async def send(upload_id: str, part: Part) -> str:
            # Streamed from the file, never held whole: a part of a 100 TiB file is 10 GiB.
            md5 = await asyncio.to_thread(md5_of_range, fd, part.offset, part.length)
            etag = await self._bucket.retried(
                "put part", key, lambda: self._put_part_once(key, upload_id, part, fd, md5)
            )
            tracker.update(part.number, part.length)
            return etag

        await self._multipart(key, split_parts(size, self._part_size), send, options)

    async def _put_part_once(
        self, key: str, upload_id: str, part: Part, fd: int, md5: bytes
    ) -> str:
        await self._throttle.upload.take(part.length)  # paced per part: see _put_once
        answer = await self._bucket.request(
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
        if etag_is_md5(unquoted_etag(etag), answer):  # else (SSE) the Content-MD5 is the check
            check_md5(self.url(key), unquoted_etag(etag), md5.hex())
        return etag

    async def _multipart(
        self,
        key: str,
        parts: Sequence[Part],
        send: Callable[[str, Part], Awaitable[str]],
        options: UploadOptions = PLAIN_UPLOAD,
    ) -> None:
        """Create a multipart upload, ``send`` every part in parallel, complete it.

        On any failure, cancellation included, the upload is aborted: an abandoned multipart
        upload keeps its parts (and their cost) in the bucket invisibly and forever.
        ``options.journal`` is told of the upload before its first part and after its end, so
        that the uploads of a writer killed mid-way are aborted by it, not by another writer.
        """
        only_if, journal, meta = options.only_if, options.journal, _metadata(options)
        created = await self._bucket.call(
            "create multipart",
            key,
            lambda c: c.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata=meta),
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
        await self._bucket.call(
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
            await self._bucket.call(
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
            return await self._bucket.request(
                "probe",
                key,
                lambda c: c.put_object(Bucket=self.bucket, Key=key, Body=b"", **condition),  # type: ignore[arg-type]
            )

        await self._bucket.retried("probe", key, lambda: put({}))
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
            await self._bucket.call(
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
            answer = await self._bucket.call(
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
        await self._bucket.call(
            "delete", key, lambda c: c.delete_object(Bucket=self.bucket, Key=key)
        )

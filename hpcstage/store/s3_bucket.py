"""One S3 bucket's aiobotocore client: how to reach the bucket (``BucketSettings``) and the one
way every request of the S3 store is sent (``S3Bucket``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession

from hpcstage.core.identity import ObjectRef
from hpcstage.errors import ObjectChangedError, StoreError
from hpcstage.retry import OnRetry, RetryPolicy, with_retries
from hpcstage.store.s3_errors import (
    MALFORMED,
    VENDOR_ERRORS,
    malformed_response,
    shown,
    translate_s3_error,
)
from hpcstage.store.throttle import Throttle

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

T = TypeVar("T")

ADDRESSING_STYLES: Final = ("path", "virtual", "auto")


@dataclass(frozen=True)
class BucketSettings:
    """How to reach one bucket: where, as whom, and over how many connections (the SDK's
    client and the lean GETs read the same settings)."""

    endpoint_url: str | None  # None: AWS S3 in ``region``
    bucket: str
    region: str
    profile: str | None
    addressing_style: str  # one of ADDRESSING_STYLES
    verify_tls: bool
    ca_bundle: str | Path | None
    credentials: Mapping[str, str] | None  # None: botocore's chain (env, files, profile)
    connect_timeout: float
    read_timeout: float
    max_connections: int

    @property
    def store_id(self) -> str:
        """The endpoint as ``ObjectRef.store`` names it."""
        return (self.endpoint_url or f"https://s3.{self.region}.amazonaws.com").rstrip("/")


def unquoted_etag(value: object) -> str:
    """An ETag as S3 sends it (quoted), unquoted; "" for none."""
    return str(value or "").strip('"')


class S3Bucket:
    """The aiobotocore client of one bucket, through which every request is sent with its
    vendor errors translated (``request``), and retried by the one policy (``call``).

    Botocore's own retries are switched off so that :mod:`hpcstage.retry` is the only retry
    policy. The client is created on first use, inside the running loop, and belongs to it.
    """

    def __init__(
        self,
        settings: BucketSettings,
        retry: RetryPolicy,
        on_retry: OnRetry | None,
        throttle: Throttle | None = None,
    ) -> None:
        self.name = settings.bucket
        self.throttle = throttle or Throttle()  # the agent's rate limits (none by default)
        self.store_id = settings.store_id
        self._retry = retry
        self._on_retry = on_retry
        self._client_args = _client_args(settings)
        self._config = AioConfig(
            max_pool_connections=settings.max_connections,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            retries={"total_max_attempts": 1},  # hpcstage.retry is the one retry policy
            s3={"addressing_style": settings.addressing_style},
            # Newer botocore adds CRC checksums many S3-compatible servers reject; we send
            # Content-MD5 and check ETags ourselves.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # "" and None both mean botocore's default chain; explicit credentials win over both.
        self._profile = (settings.profile or None) if settings.credentials is None else None
        self._stack = AsyncExitStack()
        self._lock = asyncio.Lock()
        self._s3: S3Client | None = None

    async def close(self) -> None:
        """Close the client and its connection pool (a later request opens a new one)."""
        async with self._lock:
            self._s3 = None
            await self._stack.aclose()

    def url(self, key: str) -> str:
        """``s3://bucket/key``, as messages name objects (control characters escaped)."""
        return f"s3://{self.name}/{shown(key)}"

    async def client(self) -> S3Client:
        """The client, created on first use."""
        if self._s3 is not None:
            return self._s3
        # Created lazily inside the running loop: aiohttp sessions belong to one event loop.
        async with self._lock:
            if self._s3 is None:
                session = AioSession(profile=self._profile)
                # Botocore's date parsing (dateutil) costs CPU at 1,000 per listing page: only
                # Last-Modified is read, by _nanoseconds, with the standard library's parsers.
                parsers = session.get_component("response_parser_factory")
                parsers.set_parser_defaults(timestamp_parser=str)
                creator = session.create_client("s3", config=self._config, **self._client_args)
                self._s3 = await self._stack.enter_async_context(creator)
            return self._s3

    async def request(self, op: str, key: str, fn: Callable[[S3Client], Awaitable[T]]) -> T:
        """One request, vendor errors translated; no retry. It starts when the request rate
        limit lets it."""
        await self.throttle.requests.take(1)
        try:
            client = await self.client()
        except VENDOR_ERRORS as exc:
            raise translate_s3_error(exc, f"{op} {self.url(key)}") from exc
        try:
            return await fn(client)
        except VENDOR_ERRORS as exc:
            raise translate_s3_error(exc, f"{op} {self.url(key)}") from exc
        except MALFORMED as exc:
            raise malformed_response(exc, f"{op} {self.url(key)}") from exc

    async def call(self, op: str, key: str, fn: Callable[[S3Client], Awaitable[T]]) -> T:
        """One request, retried by the policy."""
        return await self.retried(op, key, lambda: self.request(op, key, fn))

    async def retried(self, op: str, key: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt`` (one or more requests) retried by the policy."""
        return await with_retries(self._retry, f"{op} {self.url(key)}", attempt, self._on_retry)

    def ref(
        self,
        key: str,
        etag_value: object,
        size: int,
        last_modified: object = None,
        version_id: str = "",
    ) -> ObjectRef:
        """The identity of the object at ``key`` with that ETag and size (and the pinned
        ``version_id``), with its Last-Modified time where the answer had one."""
        return ObjectRef(
            self.store_id,
            self.name,
            key,
            unquoted_etag(etag_value),
            size,
            version_id,
            _nanoseconds(last_modified),
        )

    def checked_ref(
        self,
        where: str,
        key: object,
        etag_value: object,
        size: object,
        last_modified: object = None,
        version_id: str = "",
    ) -> ObjectRef:
        """An ObjectRef from what the server said, refusing what cannot identify an object.

        Without an ETag the bytes could be neither verified nor told apart from a changed
        object of the same size; a size that is not a non-negative integer is no size.
        """
        if not isinstance(key, str) or not key:
            raise StoreError(f"{where}: the store sent an entry without a key")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            what = "no size" if size is None else f"the size {shown(repr(size))}"
            raise StoreError(f"{where}: the store gave {self.url(key)} {what}")
        if not unquoted_etag(etag_value):
            raise StoreError(
                f"{where}: the store gave {self.url(key)} no ETag; its bytes cannot be verified"
            )
        return self.ref(key, etag_value, size, last_modified, version_id)

    def check_same(self, ref: ObjectRef, etag_value: object) -> None:
        """ObjectChangedError when an answer's ETag is not ``ref``'s."""
        # The ETag of each response, not If-Match: not every S3 server honours If-Match.
        if ref.etag and etag_value and unquoted_etag(etag_value) != ref.etag:
            raise ObjectChangedError(
                f"get {self.url(ref.key)}: the object changed since it was listed"
            )


def _client_args(settings: BucketSettings) -> dict[str, Any]:
    """The keyword arguments of ``AioSession.create_client`` for ``settings``."""
    verify: bool | str | None = None  # None: botocore's default (AWS_CA_BUNDLE or certifi)
    if not settings.verify_tls:
        verify = False
    elif settings.ca_bundle:
        verify = str(settings.ca_bundle)
    args: dict[str, Any] = {"endpoint_url": settings.endpoint_url, "region_name": settings.region}
    args["verify"] = verify
    credentials = settings.credentials
    if credentials is not None:
        if not credentials.get("access_key") or not credentials.get("secret_key"):
            raise ValueError("credentials need an access_key and a secret_key")
        args["aws_access_key_id"] = credentials["access_key"]
        args["aws_secret_access_key"] = credentials["secret_key"]
        args["aws_session_token"] = credentials.get("token") or None
    return args


def _nanoseconds(last_modified: object) -> int | None:
    """A Last-Modified as the answer wrote it (a listing's ISO 8601 ``2026-12-04T01:19:41.000Z``,
    a HEAD's HTTP date ``Fri, 04 Dec 2026 01:19:41 GMT``) in ns since the epoch; None for
    anything else (a store that sent none, or no date): the file then keeps its fetch time."""
    if isinstance(last_modified, datetime):
        when: datetime | None = last_modified
    elif isinstance(last_modified, str):
        when = _parsed_date(last_modified)
    else:
        return None
    if when is None or when.tzinfo is None:
        return None
    return round(when.timestamp() * 1_000_000) * 1000


def _parsed_date(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        pass
    try:
        return parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None

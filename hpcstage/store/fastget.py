"""A lean GET for small S3 objects: SigV4-signed HTTP/1.1 over pooled keep-alive connections.

Why it exists: with millions of ~4 KiB objects the SDK's per-request work (botocore's event
hooks and request building, aiohttp, turning headers into a response dict) costs far more CPU
than the bytes: about 1.5 ms per object on the benchmark machine, against ~0.1 ms here.

What it does: only the happy path of one request, a signed GET answered ``200`` with exactly
the listed size and ETag. Everything else (another status, a redirect, a chunked body, a size
or ETag other than listed, a network error, a timeout, a key with ``.``/``..`` segments) makes
``get`` return None, and the caller does the request again through aiobotocore, whose error
translation and retries stay the one place that decides what a failure means. A client whose
first requests all fall back (a server that wants something this one does not do) turns
itself off after ``GIVE_UP_AFTER`` of them and says so in the log, so a site never pays twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias
from urllib.parse import quote, urlsplit

from hpcstage.store.libc import PartSink, aligned_buffer, start_writeback

log = logging.getLogger(__name__)

EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()
GIVE_UP_AFTER: Final = 20  # fallbacks before the first success that turn the client off
_MAX_DISCARD: Final = 64 * 1024  # error bodies up to this size are read to keep the connection
_HEAD_END: Final = b"\r\n\r\n"
_Conn: TypeAlias = "tuple[asyncio.StreamReader, asyncio.StreamWriter]"


class SigV4:
    """AWS Signature Version 4 for the ``Authorization`` header (S3: payload hash as given)."""

    def __init__(
        self, access_key: str, secret_key: str, token: str, region: str, service: str = "s3"
    ) -> None:
        self.access_key = access_key
        self.token = token
        self._secret = secret_key
        self.region = region
        self.service = service
        self._keys: dict[str, bytes] = {}

    def _signing_key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            key = f"AWS4{self._secret}".encode()
            for part in (day, self.region, self.service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {day: key}  # one day's key at a time
        return key

    def authorization(
        self, method: str, host: str, path: str, query: str, headers: Mapping[str, str]
    ) -> str:
        """The header value for a request with ``headers`` (lowercase names, all signed).

        ``headers`` must hold ``x-amz-date`` and ``x-amz-content-sha256``; ``path`` is the
        request path exactly as sent (already percent-encoded), ``query`` its canonical query.
        """
        signed = {"host": host, **headers}
        names = sorted(signed)
        canonical = "\n".join(
            [
                method,
                path,
                query,
                "".join(f"{n}:{' '.join(signed[n].split())}\n" for n in names),
                ";".join(names),
                headers["x-amz-content-sha256"],
            ]
        )
        amz_date = headers["x-amz-date"]
        scope = f"{amz_date[:8]}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        signature = hmac.new(
            self._signing_key(amz_date[:8]), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        return (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )


def amz_now() -> str:
    """The current time as SigV4 wants it (``20240102T030405Z``)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


@dataclass(frozen=True)
class Endpoint:
    """Where requests for one bucket go: TCP target, ``Host`` header and path prefix."""

    connect_host: str
    port: int
    tls: bool
    host_header: str
    path_prefix: str  # "/bucket" (path style) or "" (virtual-hosted style)

    @classmethod
    def for_bucket(cls, endpoint_url: str, bucket: str, addressing_style: str) -> Endpoint:
        """The endpoint of ``bucket``; ValueError for styles or URLs this client does not do."""
        url = urlsplit(endpoint_url)
        if url.scheme not in ("http", "https") or not url.hostname or url.username:
            raise ValueError(f"unsupported endpoint {endpoint_url!r}")
        if url.path not in ("", "/") or url.query:
            raise ValueError(f"endpoint {endpoint_url!r} has a path")
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        netloc = url.netloc.rsplit("@", 1)[-1]
        if url.port in (80, 443) and url.port == (443 if tls else 80):
            netloc = netloc.rsplit(":", 1)[0]  # SDKs sign the Host without a default port
        if addressing_style == "path":
            return cls(url.hostname, port, tls, netloc, "/" + quote(bucket, safe=""))
        if addressing_style == "virtual":
            return cls(f"{bucket}.{url.hostname}", port, tls, f"{bucket}.{netloc}", "")
        raise ValueError(f"addressing style {addressing_style!r} is left to the SDK")

    def path(self, key: str) -> str | None:
        """The request path of ``key``, or None if a server might normalize it to another."""
        if any(part in (".", "..") for part in key.split("/")):
            return None
        return f"{self.path_prefix}/{quote(key, safe='/~')}"


@dataclass
class LeanStats:
    """What the lean client did: requests it served, and those it handed back."""

    served: int = 0
    fell_back: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class _Fallback(Exception):
    """This request is not one for the lean path (the reason is the message)."""


class _LeanClient:
    """What both lean clients hold: the endpoint, the signer, timeouts, an idle pool, counters.

    Counters are updated under a lock: RangeGet is called from worker threads.
    """

    _idle: list[Any]
    _what: str  # names the client in the log line that turns it off

    def __init__(
        self,
        endpoint: Endpoint,
        signer: SigV4,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int,
        clock: Callable[[], str] = amz_now,
    ) -> None:
        self.endpoint = endpoint
        self.stats = LeanStats()
        self.enabled = True
        self._signer = signer
        self._ssl = ssl_context if endpoint.tls else None
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_idle = max_idle
        self._idle = []
        self._lock = threading.Lock()
        self._clock = clock

    def _signed(self, path: str, extra: Mapping[str, str]) -> bytes:
        """The bytes of a SigV4-signed ``GET path`` with the ``extra`` headers (lowercase,
        signed)."""
        headers = {**extra, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": self._clock()}
        if self._signer.token:
            headers["x-amz-security-token"] = self._signer.token
        host = self.endpoint.host_header
        auth = self._signer.authorization("GET", host, path, "", headers)
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines += [f"Authorization: {auth}", "", ""]
        return "\r\n".join(lines).encode()

    def _path(self, key: str) -> str:
        """``key``'s request path; ``_Fallback`` for a key a server might normalize."""
        path = self.endpoint.path(key)
        if path is None:
            raise _Fallback("dot segment in key")
        return path

    def _served(self) -> None:
        with self._lock:
            self.stats.served += 1

    def _fell_back(self, reason: str) -> None:
        """Count one fallback; a client whose requests have all fallen back so far turns
        itself off after GIVE_UP_AFTER of them, with a warning in the log."""
        with self._lock:
            if not self.enabled:
                return
            stats = self.stats
            stats.fell_back += 1
            stats.reasons[reason] = stats.reasons.get(reason, 0) + 1
            if stats.served or stats.fell_back < GIVE_UP_AFTER:
                return
            self.enabled = False
            log.warning(
                "%s turned off for %s: its first %d requests fell back (%s); the SDK does them now",
                self._what,
                self.endpoint.host_header,
                stats.fell_back,
                ", ".join(f"{r}: {n}" for r, n in sorted(stats.reasons.items())),
            )


class LeanGet(_LeanClient):
    """GETs of whole small objects for one bucket; ``get`` returns the body or None."""

    _idle: list[_Conn]
    _what = "lean S3 GET of small objects"

    async def get(self, key: str, size: int, etag: str) -> bytes | None:
        """The object's bytes if the server answers 200 with ``size`` bytes and ``etag``."""
        if not self.enabled:
            return None
        try:
            body = await self._get(self._path(key), size, etag)
        except _Fallback as why:
            self._fell_back(str(why))
            return None
        self._served()
        return body

    async def _get(self, path: str, size: int, etag: str) -> bytes:
        request = self._request(path)
        for attempt in range(2):
            conn, reused = await self._connection()
            keep = False
            try:
                async with asyncio.timeout(self._read_timeout):
                    body, keep = await self._exchange(conn, request, size, etag)
                return body
            except _KeepFallback:
                keep = True  # the error answer was read whole: the connection stays good
                raise
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                # An idle keep-alive connection the server closed meanwhile: once more, fresh.
                if reused and attempt == 0:
                    continue
                raise _Fallback(f"connection: {type(exc).__name__}") from exc
            except TimeoutError as exc:
                raise _Fallback("timeout") from exc
            except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
                raise _Fallback(f"{type(exc).__name__}") from exc
            finally:
                self._put_back(conn, keep)
        raise _Fallback("connection closed twice")

    def _request(self, path: str) -> bytes:
        return self._signed(path, {})

    async def _connection(self) -> tuple[_Conn, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn[1].is_closing() and not conn[0].at_eof():
                return conn, True
            conn[1].close()
        try:
            conn = await asyncio.wait_for(
                asyncio.open_connection(
                    self.endpoint.connect_host, self.endpoint.port, ssl=self._ssl
                ),
                self._connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise _Fallback(f"connect: {type(exc).__name__}") from exc
        return conn, False

    def _put_back(self, conn: _Conn, keep: bool) -> None:
        if keep and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn[1].close()

    async def _exchange(
        self,
        conn: _Conn,
        request: bytes,
        size: int,
        etag: str,
    ) -> tuple[bytes, bool]:
        reader, writer = conn
        writer.write(request)
        head = await reader.readuntil(_HEAD_END)
        status, headers = parse_head(head)
        length = headers.get("content-length")
        chunked = headers.get("transfer-encoding", "identity").lower() != "identity"
        keep = headers.get("connection", "").lower() != "close" and not chunked
        if status != 200:
            if length is not None and length.isdigit() and int(length) <= _MAX_DISCARD and keep:
                await reader.readexactly(int(length))  # keep the connection for the next one
                raise _KeepFallback(f"status {status}")
            raise _Fallback(f"status {status}")
        if chunked or length is None or not length.isdigit():
            raise _Fallback("no content-length")
        if int(length) != size:
            raise _Fallback("size differs from listing")
        if headers.get("etag", "").strip().strip('"') != etag:
            raise _Fallback("etag differs from listing")
        body = await reader.readexactly(size)
        return body, keep

    async def close(self) -> None:
        """Close the idle connections."""
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _KeepFallback(_Fallback):
    """A fallback after which the connection is still good (an error body was read whole)."""


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status code and headers (lowercase names) of an HTTP/1.1 response head.

    ValueError for anything that is not one: a bad status line, a header line without a colon.
    """
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ValueError("not an HTTP/1.x response")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ValueError("malformed header line")
        headers[name.lower()] = value.strip()
    return int(code), headers


# --------------------------------------------------------------------------------------------
# Ranged GETs of big objects' parts, in worker threads
# --------------------------------------------------------------------------------------------

RANGE_BUFFER: Final = 1024 * 1024  # bytes received before they are written
PROGRESS_EVERY: Final = 8 * RANGE_BUFFER  # bytes between progress reports of one part
_HEAD_MAX: Final = 64 * 1024  # a response head longer than this is not one we take


class RangeAbort:
    """Stops a running ``RangeGet.fetch`` from another thread (the event loop on cancel).

    ``fetch`` checks the flag between reads; ``abort`` also shuts its socket down, so a read
    blocked on a silent server returns at once instead of after the read timeout.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    @property
    def aborted(self) -> bool:
        return self._event.is_set()

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if sock is not None and self._event.is_set():
                _shutdown(sock)

    def abort(self) -> None:
        with self._lock:
            self._event.set()
            if self._sock is not None:
                _shutdown(self._sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class RangeGet(_LeanClient):
    """One part of a big object into a file, with blocking sockets in the caller's thread.

    Why it exists: streaming a 512 MiB object through aiohttp costs about as much CPU as
    hashing it (asyncio buffers, bytes copies, a thread hop per MiB); here the kernel copies
    each MiB once into the part's page-aligned buffer (``recv_into``) and the part's
    ``PartSink`` checksums it and writes it at its offset (straight to disk with O_DIRECT
    when it can). Same contract as LeanGet: only a clean answer with exactly the asked range
    of the listed size and ETag is taken; anything else makes ``fetch`` return False (the
    bytes already written at the part's range are then overwritten by the SDK's retry of the
    part, with a fresh checksum). Thread-safe: the idle connection pool and the counters are
    behind a lock.
    """

    _idle: list[socket.socket]
    _what = "lean ranged S3 GET of big objects"

    def fetch(
        self,
        key: str,
        ref: tuple[int, str],
        span: tuple[int, int],
        sink: PartSink,
        on_bytes: Callable[[int], None],
        abort: RangeAbort,
    ) -> bool:
        """Write bytes ``span = (offset, length)`` of ``key`` (``ref = (size, etag)`` as
        listed) through ``sink`` at that offset; ``on_bytes`` gets the part's running byte
        count.

        True when the whole range is written; False to fall back to the SDK.
        """
        if not self.enabled or abort.aborted:
            return False
        try:
            self._fetch(self._path(key), ref, span, sink, on_bytes, abort)
        except _Fallback as why:
            # After an abort the socket was shut down under the read: whatever broke, that
            # is why (a broken pipe or a short read are its symptoms, not the server's).
            self._fell_back("aborted" if abort.aborted else str(why))
            return False
        self._served()
        return True

    def _fetch(
        self,
        path: str,
        ref: tuple[int, str],
        span: tuple[int, int],
        sink: PartSink,
        on_bytes: Callable[[int], None],
        abort: RangeAbort,
    ) -> None:
        offset, length = span
        request = self._request(path, offset, length)
        for attempt in range(2):
            sock, reused = self._connection()
            abort.attach(sock)
            keep = done = False
            try:
                try:
                    sock.sendall(request)
                    head, rest = _read_head(sock)
                except (ConnectionError, _Closed) as exc:
                    # An idle keep-alive connection the server closed meanwhile: once, fresh.
                    if reused and attempt == 0 and not abort.aborted:
                        continue
                    raise _Fallback(f"connection: {type(exc).__name__}") from exc
                keep = self._check_head(head, ref, span)
                _read_body(sock, rest, sink, span, on_bytes, abort)
                done = True
                return
            except _Closed as exc:
                raise _Fallback("connection closed mid-body") from exc
            except TimeoutError as exc:
                raise _Fallback("timeout") from exc
            except (OSError, ValueError) as exc:
                raise _Fallback(type(exc).__name__) from exc
            finally:
                abort.attach(None)
                # Only a connection that carried a whole answer can carry the next one.
                self._put_back(sock, done and keep and not abort.aborted)
        raise _Fallback("connection closed twice")

    def _request(self, path: str, offset: int, length: int) -> bytes:
        return self._signed(path, {"range": f"bytes={offset}-{offset + length - 1}"})

    @staticmethod
    def _check_head(head: bytes, ref: tuple[int, str], span: tuple[int, int]) -> bool:
        """Refuse (``_Fallback``) all but exactly ``span`` of the object; True: keep-alive.

        The status may be 206 or 200 (``rclone serve s3`` answers ranges with 200): what
        decides is a ``Content-Range`` naming exactly the asked bytes of an object of the
        listed size, and a ``Content-Length`` of that many bytes.
        """
        size, etag = ref
        offset, length = span
        status, headers = parse_head(head)
        if status not in (200, 206):
            raise _Fallback(f"status {status}")
        if headers.get("transfer-encoding", "identity").lower() != "identity":
            raise _Fallback("no content-length")
        if headers.get("content-length") != str(length):
            raise _Fallback("length differs from range")
        want = f"bytes {offset}-{offset + length - 1}/{size}"
        if " ".join(headers.get("content-range", "").split()) != want:
            raise _Fallback("content-range differs from range")
        if headers.get("etag", "").strip().strip('"') != etag:
            raise _Fallback("etag differs from listing")
        return headers.get("connection", "").lower() != "close"

    def _connection(self) -> tuple[socket.socket, bool]:
        with self._lock:
            sock = self._idle.pop() if self._idle else None
        if sock is not None:
            return sock, True
        try:
            raw = socket.create_connection(
                (self.endpoint.connect_host, self.endpoint.port), self._connect_timeout
            )
        except OSError as exc:
            raise _Fallback(f"connect: {type(exc).__name__}") from exc
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                raw = self._ssl.wrap_socket(raw, server_hostname=self.endpoint.connect_host)
        except OSError as exc:
            raw.close()
            raise _Fallback(f"tls: {type(exc).__name__}") from exc
        raw.settimeout(self._read_timeout)
        return raw, False

    def _put_back(self, sock: socket.socket, keep: bool) -> None:
        with self._lock:
            if keep and len(self._idle) < self._max_idle:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        """Close the idle connections."""
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


class _Closed(Exception):
    """The server closed the connection before the response was complete."""


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The response head and whatever body bytes came with it."""
    data = b""
    while True:
        chunk = sock.recv(_HEAD_MAX)
        if not chunk:
            raise _Closed()
        data += chunk
        end = data.find(_HEAD_END)
        if end >= 0:
            return data[: end + len(_HEAD_END)], data[end + len(_HEAD_END) :]
        if len(data) > _HEAD_MAX:
            raise _Fallback("response head too long")


def _read_body(
    sock: socket.socket,
    rest: bytes,
    sink: PartSink,
    span: tuple[int, int],
    on_bytes: Callable[[int], None],
    abort: RangeAbort,
) -> None:
    """Receive exactly ``span``'s length into ``sink`` at its offset, a buffer at a time."""
    offset, length = span
    if len(rest) > length:
        raise _Fallback("more bytes than the range")
    view = memoryview(aligned_buffer(RANGE_BUFFER))  # 1 MiB per part: cheap beside its bytes
    view[: len(rest)] = rest
    filled, done, reported = len(rest), 0, 0
    while done < length:
        want = min(len(view), length - done)
        while filled < want:
            if abort.aborted:
                raise _Fallback("aborted")
            got = sock.recv_into(view[filled:want])
            if not got:
                raise _Closed()
            filled += got
        sink.write(view[:want], offset + done)
        done += want
        filled = 0
        if done - reported >= PROGRESS_EVERY or done == length:
            # What went into the page cache since the last report starts on its way to disk
            # now, so the fsync before the object is indexed finds little left to write.
            start_writeback(sink.fd, offset + reported, done - reported)
            on_bytes(done)  # each report wakes the event loop: not for every buffer
            reported = done

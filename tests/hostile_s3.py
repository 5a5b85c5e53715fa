"""A small, deliberately hostile S3 server for tests: real HTTP on loopback, raw asyncio.

It speaks just enough of S3 for ListObjectsV2, HeadObject and GetObject (path-style addressing,
signatures ignored) and misbehaves on request, per bucket (listings) or per key (objects). It is
written on raw sockets rather than a web framework so that it can send exactly the bytes a broken
or malicious server would: a Content-Length that lies, a body cut off mid-way, XML that does not
parse.

    server = HostileS3()
    await server.start()                      # 127.0.0.1, a free port
    server.put("b", "p/a", b"...")            # a healthy object
    server.put("b", "p/x", b"...", mode=Mode.TRUNCATE)
    server.list_mode["b"] = ListMode.MALFORMED_XML
    ...
    await server.stop()

Every request is recorded in ``server.requests`` as (method, bucket, key) so tests can check what
a client did (e.g. that a refused key was never fetched).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import escape


class Mode(StrEnum):
    """How the server answers GET (and HEAD) for one object."""

    OK = "ok"
    TRUNCATE = "truncate"  # full Content-Length, half the body, then the connection closes
    SHORT_LENGTH = "short-length"  # Content-Length (and body) shorter than the listed size
    LONG_LENGTH = "long-length"  # Content-Length longer than the body; the connection closes
    STALL = "stall"  # right Content-Length, half the body, then silence (connection open)
    EXTRA_BYTES = "extra-bytes"  # more bytes than listed, Content-Length consistent with them
    ENDLESS = "endless"  # no Content-Length: bytes until the client gives up (8 MiB at most)
    WRONG_ETAG = "wrong-etag"  # GET answers another ETag than the listing showed
    BAD_MD5 = "bad-md5"  # ETag is the MD5 of the listed bytes; the body is corrupted
    CHANGES = "changes"  # replaced between list and get: new bytes, new size, new ETag
    SSE_KMS = "sse-kms"  # encrypted with SSE-KMS, as AWS does it: an ETag that is no MD5


class ListMode(StrEnum):
    """How the server answers ListObjectsV2 for one bucket."""

    OK = "ok"
    MALFORMED_XML = "malformed-xml"  # cut off mid-element
    NOT_XML = "not-xml"  # an HTML error page with status 200
    BAD_SIZE = "bad-size"  # <Size>lots</Size>
    NEGATIVE_SIZE = "negative-size"  # <Size>-5</Size>
    NO_KEY = "no-key"  # a <Contents> without <Key>
    NO_ETAG = "no-etag"  # <Contents> without <ETag>
    OUTSIDE_PREFIX = "outside-prefix"  # a key that does not start with the requested prefix
    LOOP = "loop"  # IsTruncated forever, the same continuation token every time
    SERVER_ERROR = "server-error"  # 500 InternalError every time


@dataclass
class StoredObject:
    data: bytes
    mode: Mode = Mode.OK

    @property
    def etag(self) -> str:
        if self.mode is Mode.SSE_KMS:  # 32 hex digits, as AWS's, but not the MD5 of the data
            return hashlib.sha256(self.data).hexdigest()[:32]
        return hashlib.md5(self.data, usedforsecurity=False).hexdigest()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""


_REASONS = {200: "OK", 404: "Not Found", 500: "Internal Server Error"}
_ENDLESS_LIMIT = 8 * 2**20
_PAGE = 1000


@dataclass
class HostileS3:
    """A misbehaving S3 endpoint; ``objects[bucket][key]`` and ``list_mode[bucket]`` steer it."""

    host: str = "127.0.0.1"
    objects: dict[str, dict[str, StoredObject]] = field(default_factory=dict)
    list_mode: dict[str, ListMode] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def put(self, bucket: str, key: str, data: bytes, mode: Mode = Mode.OK) -> StoredObject:
        obj = StoredObject(data, mode)
        self.objects.setdefault(bucket, {})[key] = obj
        return obj

    def gets(self, key: str) -> int:
        """How many GETs asked for ``key``."""
        return sum(1 for method, _, k in self.requests if method == "GET" and k == key)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()  # a STALL answer waits forever otherwise
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    # -- HTTP ------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection must close."""
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if int(headers.get("content-length", "0") or 0):
            await reader.readexactly(int(headers["content-length"]))
        url = urlsplit(target)
        bucket, _, raw_key = url.path.lstrip("/").partition("/")
        key = unquote(raw_key)
        self.requests.append((method, bucket, key))
        if method == "GET" and not raw_key and "list-type" in url.query:
            response = self._list(bucket, parse_qs(url.query, keep_blank_values=True))
            return await self._send(writer, response, head_only=False)
        obj = self.objects.get(bucket, {}).get(key)
        if method not in ("GET", "HEAD") or obj is None:
            return await self._send(writer, _error(404, "NoSuchKey", key), method == "HEAD")
        return await self._object(writer, obj, method == "HEAD")

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, head_only: bool
    ) -> bool:
        headers = {"Content-Length": str(len(response.body)), **response.headers}
        await self._write_head(writer, response.status, headers)
        if not head_only:
            writer.write(response.body)
        await writer.drain()
        return True

    async def _write_head(
        self, writer: asyncio.StreamWriter, status: int, headers: dict[str, str]
    ) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Whatever')}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def _object(self, writer: asyncio.StreamWriter, obj: StoredObject, head: bool) -> bool:
        data, etag, length = obj.data, obj.etag, len(obj.data)
        mode = obj.mode
        if mode is Mode.WRONG_ETAG:
            etag = "0" * 32
        elif mode is Mode.BAD_MD5:
            data = bytes(b ^ 0xFF for b in data[:1]) + data[1:]
        elif mode is Mode.CHANGES:
            data = data + b" and then some"
            etag, length = hashlib.md5(data, usedforsecurity=False).hexdigest(), len(data)
        elif mode is Mode.SHORT_LENGTH:
            data = data[: len(data) // 2]
            length = len(data)
        elif mode is Mode.EXTRA_BYTES:
            data = data + b"X" * 4096
            length = len(data)
        headers = {"ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
        headers["Last-Modified"] = "Mon, 01 Jan 2024 00:00:00 GMT"
        if mode is Mode.SSE_KMS:
            headers["x-amz-server-side-encryption"] = "aws:kms"
        if mode is Mode.ENDLESS:
            headers["Connection"] = "close"
        elif mode is Mode.LONG_LENGTH:
            headers["Content-Length"] = str(length + 1000)
        else:
            headers["Content-Length"] = str(length)
        if mode is Mode.TRUNCATE:
            headers["Connection"] = "close"
        await self._write_head(writer, 200, headers)
        if head:
            await writer.drain()
            return True
        return await self._body(writer, mode, data)

    async def _body(self, writer: asyncio.StreamWriter, mode: Mode, data: bytes) -> bool:
        if mode in (Mode.TRUNCATE, Mode.STALL):
            writer.write(data[: len(data) // 2])
            await writer.drain()
            if mode is Mode.STALL:
                await asyncio.sleep(3600)  # until the client gives up; stop() cancels this
            return False  # close with bytes missing
        writer.write(data)
        await writer.drain()
        if mode is Mode.LONG_LENGTH:
            return False
        if mode is Mode.ENDLESS:
            sent = len(data)
            while sent < _ENDLESS_LIMIT:
                writer.write(b"E" * 65536)
                await writer.drain()
                sent += 65536
            return False
        return True

    # -- ListObjectsV2 ---------------------------------------------------------------------

    def _list(self, bucket: str, query: dict[str, list[str]]) -> Response:
        mode = self.list_mode.get(bucket, ListMode.OK)
        prefix = query.get("prefix", [""])[0]
        url_encoded = query.get("encoding-type", [""])[0] == "url"
        if mode is ListMode.SERVER_ERROR:
            return _error(500, "InternalError", "the hostile server is having a bad day")
        if mode is ListMode.NOT_XML:
            return Response(200, {"Content-Type": "text/html"}, b"<html><body>Oops</body></html>")
        keys = sorted(k for k in self.objects.get(bucket, {}) if k.startswith(prefix))
        start = int(query.get("continuation-token", ["0"])[0] or 0)
        page = keys[start : start + _PAGE]
        truncated = start + _PAGE < len(keys)
        entries = [self._entry(bucket, key, mode, url_encoded) for key in page]
        if mode is ListMode.OUTSIDE_PREFIX:
            entries.append(_contents(_enc("/etc/passwd", url_encoded), '"' + "1" * 32 + '"', "5"))
        tail = ""
        if mode is ListMode.LOOP:
            truncated, tail = True, "<NextContinuationToken>0</NextContinuationToken>"
        elif truncated:
            tail = f"<NextContinuationToken>{start + _PAGE}</NextContinuationToken>"
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>{escape(bucket)}</Name><Prefix>{escape(_enc(prefix, url_encoded))}</Prefix>"
            f"<KeyCount>{len(entries)}</KeyCount><MaxKeys>{_PAGE}</MaxKeys>"
            + ("<EncodingType>url</EncodingType>" if url_encoded else "")
            + f"<IsTruncated>{str(truncated).lower()}</IsTruncated>{tail}"
            + "".join(entries)
            + "</ListBucketResult>"
        ).encode()
        if mode is ListMode.MALFORMED_XML:
            body = body[: body.index(b"<Contents>") + 40]
        return Response(200, {"Content-Type": "application/xml"}, body)

    def _entry(self, bucket: str, key: str, mode: ListMode, url_encoded: bool) -> str:
        obj = self.objects[bucket][key]
        size = {ListMode.BAD_SIZE: "lots", ListMode.NEGATIVE_SIZE: "-5"}.get(
            mode, str(len(obj.data))
        )
        etag = "" if mode is ListMode.NO_ETAG else f'"{obj.etag}"'
        encoded = "" if mode is ListMode.NO_KEY else _enc(key, url_encoded)
        return _contents(encoded, etag, size)


def _enc(key: str, url_encoded: bool) -> str:
    # As S3 does with encoding-type=url: control characters survive XML only this way.
    return quote(key, safe="/") if url_encoded else key


def _contents(key: str, etag: str, size: str) -> str:
    parts = [f"<Key>{escape(key)}</Key>"] if key else []
    parts.append("<LastModified>2024-01-01T00:00:00.000Z</LastModified>")
    if etag:
        parts.append(f"<ETag>{escape(etag)}</ETag>")
    parts.append(f"<Size>{size}</Size><StorageClass>STANDARD</StorageClass>")
    return "<Contents>" + "".join(parts) + "</Contents>"


def _error(status: int, code: str, message: str) -> Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
        "<RequestId>hostile</RequestId></Error>"
    ).encode()
    return Response(status, {"Content-Type": "application/xml"}, body)

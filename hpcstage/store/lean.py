"""A lean GET for small S3 objects: SigV4-signed HTTP/1.1 over pooled keep-alive connections.

Why it exists: with millions of small objects the SDK's per-request work (botocore's event
hooks and request building, aiohttp, turning headers into a response dict) costs far more CPU
than the bytes, and a plain signed GET costs a small fraction of it (the measured figures are
in docs/benchmarks.md, "What changed since the first run", item 1).

What it does: only the happy path (see hpcstage.store.lean_client): ``get`` returns the body,
or None and the caller does the request again through aiobotocore.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final, TypeAlias

from hpcstage.store.lean_client import HEAD_END, Fallback, LeanClient, parse_head

_MAX_DISCARD: Final = 64 * 1024  # error bodies up to this size are read to keep the connection
_Conn: TypeAlias = "tuple[asyncio.StreamReader, asyncio.StreamWriter]"


class LeanGet(LeanClient):
    """GETs of whole small objects for one bucket; ``get`` returns the body or None."""

    _idle: list[_Conn]
    _what = "lean S3 GET of small objects"

    async def get(self, key: str, size: int, etag: str) -> bytes | None:
        """The object's bytes if the server answers 200 with ``size`` bytes and ``etag``."""
        if not self.enabled:
            return None
        try:
            body = await self._get(self._path(key), size, etag)
        except Fallback as why:
            self._fell_back(str(why))
            return None
        self._served()
        await self._throttle.download.take(len(body))  # the next GET waits for this one's bytes
        return body

    async def _get(self, path: str, size: int, etag: str) -> bytes:
        request = self._request(path)
        for attempt in range(2):
            await self._throttle.requests.take(1)
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
                raise Fallback(f"connection: {type(exc).__name__}") from exc
            except TimeoutError as exc:
                raise Fallback("timeout") from exc
            except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
                raise Fallback(f"{type(exc).__name__}") from exc
            finally:
                self._put_back(conn, keep)
        raise Fallback("connection closed twice")

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
            raise Fallback(f"connect: {type(exc).__name__}") from exc
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
        head = await reader.readuntil(HEAD_END)
        status, headers = parse_head(head)
        length = headers.get("content-length")
        chunked = headers.get("transfer-encoding", "identity").lower() != "identity"
        keep = headers.get("connection", "").lower() != "close" and not chunked
        if status != 200:
            if length is not None and length.isdigit() and int(length) <= _MAX_DISCARD and keep:
                await reader.readexactly(int(length))  # keep the connection for the next one
                raise _KeepFallback(f"status {status}")
            raise Fallback(f"status {status}")
        if chunked or length is None or not length.isdigit():
            raise Fallback("no content-length")
        if int(length) != size:
            raise Fallback("size differs from listing")
        if headers.get("etag", "").strip().strip('"') != etag:
            raise Fallback("etag differs from listing")
        body = await reader.readexactly(size)
        return body, keep

    async def close(self) -> None:
        """Close the idle connections."""
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _KeepFallback(Fallback):
    """A fallback after which the connection is still good (an error body was read whole)."""

"""A TCP proxy in front of an S3 server that counts, per object key, the GETs that asked for
it and the bytes the server answered them with: what "the store served this object once"
means, whether in one GET or in ranged parts.

    proxy = CountingProxy("127.0.0.1", 9000)
    endpoint = proxy.start()          # http://127.0.0.1:<port>, served from its own thread
    ...                               # point clients at endpoint
    proxy.served("bucket", "key")     # bytes of the answers to GETs of that key (headers too)
    proxy.stop()

It reads the requests' heads (path-style addressing, HTTP/1.1 without pipelining, which the
AWS SDKs and hpcstage's lean GET use) and forwards every byte both ways unchanged. A request
body it cannot delimit (chunked) makes it stop reading that connection's requests: what it
then forwards is counted under no key.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from urllib.parse import unquote, urlsplit

_NONE = ("", "")
Current = list[tuple[str, str]]  # one cell: the (bucket, key) whose answer flows now


class CountingProxy:
    """Forwards to ``upstream``; counts GETs and answer bytes per (bucket, key)."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.gets: Counter[tuple[str, str]] = Counter()
        self.bytes: Counter[tuple[str, str]] = Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._lock = threading.Lock()

    def start(self) -> str:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        return f"http://127.0.0.1:{future.result(30)}"

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    def served(self, bucket: str, key: str) -> int:
        with self._lock:
            return self.bytes[(bucket, key)]

    def get_count(self, bucket: str, key: str) -> int:
        with self._lock:
            return self.gets[(bucket, key)]

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _connection(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        current: Current = [_NONE]
        try:
            await asyncio.gather(
                self._requests(client_r, up_w, current), self._answers(up_r, client_w, current)
            )
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            for writer in (client_w, up_w):
                writer.close()

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, current: Current
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                writer.close()
                return
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            bucket, _, key = urlsplit(target).path.lstrip("/").partition("/")
            obj = (bucket, unquote(key)) if method == "GET" and key else _NONE
            with self._lock:
                if obj != _NONE:
                    self.gets[obj] += 1
            current[0] = obj
            writer.write(head)
            if "chunked" in headers.get("transfer-encoding", ""):
                current[0] = _NONE
                await _pipe(reader, writer)
                return
            length = int(headers.get("content-length", "0") or 0)
            while length:
                chunk = await reader.read(min(length, 1 << 20))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", length)
                writer.write(chunk)
                length -= len(chunk)
            await writer.drain()

    async def _answers(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, current: Current
    ) -> None:
        while chunk := await reader.read(1 << 20):
            with self._lock:
                self.bytes[current[0]] += len(chunk)
            writer.write(chunk)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(1 << 20):
        writer.write(chunk)
        await writer.drain()

"""Ranged GETs of big objects' parts, with blocking sockets in worker threads (see RangeGet)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Final

from hpcstage.store.lean_client import HEAD_END, Fallback, LeanClient, parse_head
from hpcstage.store.libc import PartSink, aligned_buffer, start_writeback

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

    @property
    def event(self) -> threading.Event:
        """Set on abort (a rate limit's wait ends on it)."""
        return self._event

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


class RangeGet(LeanClient):
    """One part of a big object into a file, with blocking sockets in the caller's thread.

    Why it exists: streaming a big object through aiohttp costs much CPU for every byte
    (asyncio buffers, bytes copies, a thread hop per MiB; docs/benchmarks.md, "What changed
    since the first run", item 7); here the kernel copies each MiB once into the part's
    page-aligned buffer (``recv_into``) and the part's ``PartSink`` checksums it and writes
    it at its offset (straight to disk with O_DIRECT when it can). Same contract as LeanGet:
    only a clean answer with exactly the asked range of the listed size and ETag is taken;
    anything else makes ``fetch`` return False (the bytes already written at the part's range
    are then overwritten by the SDK's retry of the part, with a fresh checksum). Thread-safe:
    the idle connection pool and the counters are behind a lock.
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
        except Fallback as why:
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
            self._throttle.requests.take_blocking(1, abort.event)
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
                    raise Fallback(f"connection: {type(exc).__name__}") from exc
                keep = self._check_head(head, ref, span)
                _read_body(sock, rest, sink, span, on_bytes, abort, self._pace)
                done = True
                return
            except _Closed as exc:
                raise Fallback("connection closed mid-body") from exc
            except TimeoutError as exc:
                raise Fallback("timeout") from exc
            except (OSError, ValueError) as exc:
                raise Fallback(type(exc).__name__) from exc
            finally:
                abort.attach(None)
                # Only a connection that carried a whole answer can carry the next one.
                self._put_back(sock, done and keep and not abort.aborted)
        raise Fallback("connection closed twice")

    def _pace(self, received: int, abort: RangeAbort) -> None:
        """Hold the thread until ``received`` bytes fit the agent's download limit."""
        self._throttle.download.take_blocking(received, abort.event)

    def _request(self, path: str, offset: int, length: int) -> bytes:
        return self._signed(path, {"range": f"bytes={offset}-{offset + length - 1}"})

    @staticmethod
    def _check_head(head: bytes, ref: tuple[int, str], span: tuple[int, int]) -> bool:
        """Refuse (``Fallback``) all but exactly ``span`` of the object; True: keep-alive.

        The status may be 206 or 200 (``rclone serve s3`` answers ranges with 200): what
        decides is a ``Content-Range`` naming exactly the asked bytes of an object of the
        listed size, and a ``Content-Length`` of that many bytes.
        """
        size, etag = ref
        offset, length = span
        status, headers = parse_head(head)
        if status not in (200, 206):
            raise Fallback(f"status {status}")
        if headers.get("transfer-encoding", "identity").lower() != "identity":
            raise Fallback("no content-length")
        if headers.get("content-length") != str(length):
            raise Fallback("length differs from range")
        want = f"bytes {offset}-{offset + length - 1}/{size}"
        if " ".join(headers.get("content-range", "").split()) != want:
            raise Fallback("content-range differs from range")
        if headers.get("etag", "").strip().strip('"') != etag:
            raise Fallback("etag differs from listing")
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
            raise Fallback(f"connect: {type(exc).__name__}") from exc
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                raw = self._ssl.wrap_socket(raw, server_hostname=self.endpoint.connect_host)
        except OSError as exc:
            raw.close()
            raise Fallback(f"tls: {type(exc).__name__}") from exc
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
        end = data.find(HEAD_END)
        if end >= 0:
            return data[: end + len(HEAD_END)], data[end + len(HEAD_END) :]
        if len(data) > _HEAD_MAX:
            raise Fallback("response head too long")


def _read_body(
    sock: socket.socket,
    rest: bytes,
    sink: PartSink,
    span: tuple[int, int],
    on_bytes: Callable[[int], None],
    abort: RangeAbort,
    pace: Callable[[int, RangeAbort], None],
) -> None:
    """Receive exactly ``span``'s length into ``sink`` at its offset, a buffer at a time,
    each buffer paced by the download limit (``pace``) before the next is read."""
    offset, length = span
    if len(rest) > length:
        raise Fallback("more bytes than the range")
    view = memoryview(aligned_buffer(RANGE_BUFFER))  # 1 MiB per part: cheap beside its bytes
    view[: len(rest)] = rest
    filled, done, reported = len(rest), 0, 0
    while done < length:
        want = min(len(view), length - done)
        while filled < want:
            if abort.aborted:
                raise Fallback("aborted")
            got = sock.recv_into(view[filled:want])
            if not got:
                raise _Closed()
            filled += got
        pace(want, abort)
        sink.write(view[:want], offset + done)
        done += want
        filled = 0
        if done - reported >= PROGRESS_EVERY or done == length:
            # What went into the page cache since the last report starts on its way to disk
            # now, so the fsync before the object is indexed finds little left to write.
            if sink.writeback:
                start_writeback(sink.fd, offset + reported, done - reported)
            on_bytes(done)  # each report wakes the event loop: not for every buffer
            reported = done

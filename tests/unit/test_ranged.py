"""The lean ranged GET (hpcstage.store.ranged.RangeGet) against a scripted HTTP peer on loopback.

Each test scripts what the "server" answers to one ranged GET, then checks what ``fetch``
did: the bytes at the right offset and True for a clean answer; False (the SDK's turn), the
reason counted, and no byte outside the asked range for everything else.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hpcstage.store import checksums, ranged
from hpcstage.store.lean_client import Endpoint
from hpcstage.store.libc import PartSink, open_direct
from hpcstage.store.ranged import PROGRESS_EVERY, RangeAbort, RangeGet
from hpcstage.store.sigv4 import SigV4

SIZE = 3 * 1024 * 1024 + 17  # the listed object: more than two receive buffers, odd length
ETAG = "0123456789abcdef0123456789abcdef"
OBJECT = bytes(range(256)) * (SIZE // 256) + bytes(SIZE % 256)
RANGE = re.compile(rb"\r\nrange: bytes=(\d+)-(\d+)\r\n", re.IGNORECASE)

# (connection, first, last) -> False to close the connection afterwards
Script = Callable[[socket.socket, int, int], bool]


def answer(
    conn: socket.socket,
    first: int,
    last: int,
    *,
    status: str = "206 Partial Content",
    etag: str = ETAG,
    content_range: str | None = None,
    length: int | None = None,
    body: bytes | None = None,
    extra: str = "",
) -> None:
    body = OBJECT[first : last + 1] if body is None else body
    cr = f"bytes {first}-{last}/{SIZE}" if content_range is None else content_range
    head = f'HTTP/1.1 {status}\r\nETag: "{etag}"\r\n'
    if cr:
        head += f"Content-Range: {cr}\r\n"
    head += f"Content-Length: {len(body) if length is None else length}\r\n{extra}\r\n"
    conn.sendall(head.encode() + body)


class Peer:
    """Accepts connections; answers each request on them with the next script in line."""

    def __init__(self, scripts: list[Script]) -> None:
        self.scripts = scripts
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while self.scripts:
                data = b""
                while b"\r\n\r\n" not in data:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    data += chunk
                self.requests.append(data)
                match = RANGE.search(data)
                assert match is not None
                script = self.scripts.pop(0)
                try:
                    if not script(conn, int(match[1]), int(match[2])):
                        return
                except OSError:
                    return

    def close(self) -> None:
        self.listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    path = tmp_path / "object"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, SIZE)
    try:
        yield fd, path
    finally:
        os.close(fd)


def client(peer: Peer, read_timeout: float = 5.0) -> RangeGet:
    endpoint = Endpoint.for_bucket(f"http://127.0.0.1:{peer.port}", "b", "path")
    signer = SigV4("AKID", "secret", "", "us-east-1")
    return RangeGet(
        endpoint,
        signer,
        ssl_context=None,
        connect_timeout=2.0,
        read_timeout=read_timeout,
        max_idle=4,
    )


def run(
    scripts: list[Script],
    fd: int,
    span: tuple[int, int],
    *,
    read_timeout: float = 5.0,
    key: str = "dir/obj",
    sink: PartSink | None = None,
) -> tuple[bool, RangeGet, Peer, list[int]]:
    peer = Peer(scripts)
    get = client(peer, read_timeout)
    progress: list[int] = []
    sink = sink or PartSink(fd)
    try:
        ok = get.fetch(key, (SIZE, ETAG), span, sink, progress.append, RangeAbort())
    finally:
        get.close()
        peer.close()
    return ok, get, peer, progress


def clean(conn: socket.socket, first: int, last: int) -> bool:
    answer(conn, first, last)
    return True


def test_a_clean_answer_lands_at_the_parts_offset(target: tuple[int, Path]) -> None:
    fd, path = target
    span = (1024 * 1024 + 5, 2 * 1024 * 1024 + 3)  # two buffers and a bit, unaligned
    ok, get, peer, progress = run([clean], fd, span)
    assert ok
    data = path.read_bytes()
    assert data[span[0] : span[0] + span[1]] == OBJECT[span[0] : span[0] + span[1]]
    assert data[: span[0]] == bytes(span[0])  # nothing outside the range was touched
    assert data[span[0] + span[1] :] == bytes(SIZE - span[0] - span[1])
    # Three buffers, one report: the loop is woken every PROGRESS_EVERY bytes and at the end.
    assert progress == [span[1]] and span[1] < PROGRESS_EVERY
    assert (get.stats.served, get.stats.fell_back) == (1, 0)
    request = peer.requests[0]
    assert request.startswith(b"GET /b/dir/obj HTTP/1.1\r\n")
    assert b"SignedHeaders=host;range;x-amz-content-sha256;x-amz-date," in request


def test_what_is_written_starts_on_its_way_to_disk_range_by_range(
    target: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, _ = target
    monkeypatch.setattr(ranged, "PROGRESS_EVERY", 1024 * 1024)  # a report per buffer
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(ranged, "start_writeback", lambda _fd, off, n: started.append((off, n)))
    span = (1024 * 1024 + 5, 2 * 1024 * 1024 + 3)
    ok, _, _, progress = run([clean], fd, span)
    assert ok and progress == [1024 * 1024, 2 * 1024 * 1024, span[1]]
    # Each report hands the bytes written since the previous one to writeback: the ranges
    # follow each other and cover exactly the part, at its offset in the file.
    assert started == [
        (span[0], 1024 * 1024),
        (span[0] + 1024 * 1024, 1024 * 1024),
        (span[0] + 2 * 1024 * 1024, 3),
    ]


def test_a_sink_without_writeback_starts_none(
    target: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, _ = target
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(ranged, "start_writeback", lambda _fd, off, n: started.append((off, n)))
    span = (0, 2 * 1024 * 1024)
    ok, _, _, _ = run([clean], fd, span, sink=PartSink(fd, writeback=False))
    assert ok
    assert started == []


def test_a_direct_sink_gets_the_aligned_bytes_and_the_checksum_sees_every_byte(
    target: tuple[int, Path],
) -> None:
    # The object's last part: it starts on a block and ends 17 bytes past one.
    fd, path = target
    try:
        direct_fd = open_direct(fd)
    except OSError as exc:
        pytest.skip(f"this file system refuses O_DIRECT: {exc}")
    if direct_fd < 0:
        pytest.skip("no O_DIRECT on this platform")
    span = (1024 * 1024, SIZE - 1024 * 1024)
    checksum = checksums.new("crc64nvme")
    sink = PartSink(fd, direct_fd, checksum)
    try:
        ok, _, _, progress = run([clean], fd, span, sink=sink)
    finally:
        os.close(direct_fd)
    assert ok and progress == [span[1]]
    data = path.read_bytes()
    assert data[span[0] :] == OBJECT[span[0] :]
    assert data[: span[0]] == bytes(span[0])
    assert checksum.value() == checksums.compute("crc64nvme", OBJECT[span[0] :])
    # Everything but the 17 bytes after the last whole 4 KiB block went around the page cache.
    assert (sink.direct_bytes, sink.direct_refused) == (span[1] - 17, None)


def test_200_with_the_exact_content_range_is_taken(target: tuple[int, Path]) -> None:
    # rclone serve s3 answers ranged GETs with 200 and a Content-Range.
    fd, path = target

    def ok_200(conn: socket.socket, first: int, last: int) -> bool:
        answer(conn, first, last, status="200 OK")
        return True

    ok, _, _, _ = run([ok_200], fd, (0, SIZE))
    assert ok and path.read_bytes() == OBJECT


def test_keep_alive_connections_are_reused_and_a_stale_one_is_retried_fresh(
    target: tuple[int, Path],
) -> None:
    fd, path = target

    def then_close(conn: socket.socket, first: int, last: int) -> bool:
        answer(conn, first, last)
        return False  # the server drops the idle connection after answering

    peer = Peer([clean, then_close, clean])
    get = client(peer)
    try:
        for offset in (0, 1024 * 1024, 2 * 1024 * 1024):
            span = (offset, 1024 * 1024)
            assert get.fetch("k", (SIZE, ETAG), span, PartSink(fd), lambda _: None, RangeAbort())
    finally:
        get.close()
        peer.close()
    assert path.read_bytes()[: 3 * 1024 * 1024] == OBJECT[: 3 * 1024 * 1024]
    assert peer.connections == 2  # reused once; the closed one replaced once
    assert (get.stats.served, get.stats.fell_back) == (3, 0)


def _refused(**kwargs: object) -> Script:
    def script(conn: socket.socket, first: int, last: int) -> bool:
        answer(conn, first, last, **kwargs)  # type: ignore[arg-type]
        return True

    return script


def _whole_object(conn: socket.socket, first: int, last: int) -> bool:
    answer(conn, 0, SIZE - 1, status="200 OK", content_range="")
    return True


def _truncated(conn: socket.socket, first: int, last: int) -> bool:
    answer(conn, first, last, length=last - first + 1, body=OBJECT[first : first + 1000])
    return False


def _chunked(conn: socket.socket, first: int, last: int) -> bool:
    conn.sendall(b'HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\nETag: "x"\r\n\r\n')
    return False


def _garbage(conn: socket.socket, first: int, last: int) -> bool:
    conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")
    return False


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (_whole_object, "length differs from range"),
        (_refused(content_range=f"bytes 0-99/{SIZE}"), "content-range differs from range"),
        (_refused(content_range="bytes 0-1048575/999"), "content-range differs from range"),
        (_refused(etag="ffff"), "etag differs from listing"),
        (_refused(status="403 Forbidden"), "status 403"),
        (_refused(status="404 Not Found"), "status 404"),
        (_refused(status="503 Slow Down"), "status 503"),
        (_refused(length=5), "length differs from range"),
        (_truncated, "connection closed mid-body"),
        (_chunked, "no content-length"),
        (_garbage, "ValueError"),
    ],
)
def test_anything_but_the_exact_range_falls_back(
    target: tuple[int, Path], script: Script, reason: str
) -> None:
    fd, path = target
    span = (1024 * 1024, 1024 * 1024)
    ok, get, _, _ = run([script], fd, span)
    assert not ok
    assert get.stats.reasons == {reason: 1}
    data = path.read_bytes()
    outside = data[: span[0]] + data[span[0] + span[1] :]
    assert outside == bytes(SIZE - span[1])  # never a byte outside the asked range


def test_a_server_that_sends_more_than_the_range_is_refused(target: tuple[int, Path]) -> None:
    fd, path = target

    def extra(conn: socket.socket, first: int, last: int) -> bool:
        # Consistent head, then more body bytes than asked arrive with it.
        body = OBJECT[first : last + 1] + b"X" * 100
        answer(conn, first, last, length=last - first + 1, body=body)
        return False

    ok, get, _, _ = run([extra], fd, (0, 64))
    assert not ok and get.stats.reasons == {"more bytes than the range": 1}
    assert path.read_bytes() == bytes(SIZE)


def _stalls_until(release: threading.Event) -> Script:
    """A script that announces the range, sends 10 bytes of it, then is silent until
    ``release`` (the connection stays open)."""

    def stall(conn: socket.socket, first: int, last: int) -> bool:
        answer(conn, first, last, length=last - first + 1, body=OBJECT[first : first + 10])
        release.wait(10)
        return False

    return stall


def test_a_stalled_body_times_out(target: tuple[int, Path]) -> None:
    fd, _ = target
    release = threading.Event()
    peer = Peer([_stalls_until(release)])
    get = client(peer, read_timeout=0.3)
    try:
        started = time.monotonic()
        ok = get.fetch("k", (SIZE, ETAG), (0, 1024), PartSink(fd), lambda _: None, RangeAbort())
        assert time.monotonic() - started < 2
    finally:
        release.set()
        get.close()
        peer.close()
    assert not ok and get.stats.reasons == {"timeout": 1}


def test_abort_stops_a_read_blocked_on_a_silent_server(target: tuple[int, Path]) -> None:
    fd, _ = target
    release = threading.Event()
    peer = Peer([_stalls_until(release)])
    get = client(peer, read_timeout=30.0)
    abort = RangeAbort()
    result: list[bool] = []
    worker = threading.Thread(
        target=lambda: result.append(
            get.fetch("k", (SIZE, ETAG), (0, 1024), PartSink(fd), lambda _: None, abort)
        )
    )
    try:
        worker.start()
        time.sleep(0.3)
        started = time.monotonic()
        abort.abort()
        worker.join(5)
        assert not worker.is_alive() and time.monotonic() - started < 2
    finally:
        release.set()
        get.close()
        peer.close()
    assert result == [False]
    assert get.stats.reasons == {"aborted": 1}


def test_it_turns_itself_off_when_nothing_ever_works(target: tuple[int, Path]) -> None:
    fd, _ = target
    scripts: list[Script] = [_refused(status="501 Not Implemented")] * 25
    peer = Peer(list(scripts))
    get = client(peer)
    try:
        results = [
            get.fetch("k", (SIZE, ETAG), (0, 10), PartSink(fd), lambda _: None, RangeAbort())
            for _ in range(25)
        ]
    finally:
        get.close()
        peer.close()
    assert not any(results)
    assert not get.enabled
    assert get.stats.fell_back == 20  # then it stopped asking


def test_dot_segments_are_left_to_the_sdk(target: tuple[int, Path]) -> None:
    fd, _ = target
    ok, get, peer, _ = run([clean], fd, (0, 10), key="a/../b")
    assert not ok and get.stats.reasons == {"dot segment in key": 1}
    assert peer.requests == []

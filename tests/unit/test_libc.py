"""hpcstage.store.libc: pwrite_all lands every byte at its offset, in slices, short writes or not;
PartSink writes around the page cache where it can and through it where it cannot."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcstage.store import libc


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_writes_everything_at_the_offset_in_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: type
) -> None:
    data = os.urandom(3 * libc.WRITE_SLICE + 12345)
    sizes: list[int] = []
    real = os.pwrite

    def recording(fd: int, chunk: bytes, offset: int) -> int:
        sizes.append(len(chunk))
        return real(fd, chunk, offset)

    monkeypatch.setattr(libc.os, "pwrite", recording)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        libc.pwrite_all(fd, kind(data), 7)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 7 + data
    assert max(sizes) == libc.WRITE_SLICE
    assert sum(sizes) == len(data)


def test_short_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(100_000)
    real = os.pwrite
    monkeypatch.setattr(libc.os, "pwrite", lambda fd, chunk, off: real(fd, chunk[:999], off))
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        libc.pwrite_all(fd, data, 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == data


BLOCK = libc.DIRECT_ALIGN


@pytest.fixture
def two_fds(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        direct_fd = libc.open_direct(fd)
    except OSError as exc:
        os.close(fd)
        pytest.skip(f"this file system refuses O_DIRECT: {exc}")
    try:
        if direct_fd < 0:
            pytest.skip("no O_DIRECT on this platform")
        yield fd, direct_fd, path
    finally:
        os.close(fd)
        if direct_fd >= 0:
            os.close(direct_fd)


def aligned(data: bytes) -> memoryview:
    buffer = libc.aligned_buffer(1024 * 1024)
    view = memoryview(buffer)[: len(data)]
    view[:] = data
    return view


def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """(fd, offset, length) of every pwrite(2) from now on."""
    calls: list[tuple[int, int, int]] = []
    real = os.pwrite

    def recording(fd: int, chunk: memoryview, offset: int) -> int:
        calls.append((fd, offset, len(chunk)))
        return real(fd, chunk, offset)

    monkeypatch.setattr(libc.os, "pwrite", recording)
    return calls


def test_a_sink_writes_whole_blocks_direct_and_the_tail_buffered(
    two_fds: tuple[int, int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, direct_fd, path = two_fds
    data = os.urandom(3 * BLOCK + 100)
    seen = bytearray()
    sink = libc.PartSink(fd, direct_fd, checksum=_Collect(seen))
    calls = recorded(monkeypatch)
    sink.write(aligned(data), 2 * BLOCK)
    assert path.read_bytes() == bytes(2 * BLOCK) + data
    assert calls == [(direct_fd, 2 * BLOCK, 3 * BLOCK), (fd, 5 * BLOCK, 100)]
    assert (sink.direct_bytes, sink.direct_refused, bytes(seen)) == (3 * BLOCK, None, data)


def test_an_offset_off_the_block_goes_through_the_page_cache(
    two_fds: tuple[int, int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, direct_fd, path = two_fds
    data = os.urandom(2 * BLOCK)
    sink = libc.PartSink(fd, direct_fd)
    calls = recorded(monkeypatch)
    sink.write(aligned(data), 10)
    assert path.read_bytes() == bytes(10) + data
    assert [c[0] for c in calls] == [fd] and sink.direct_bytes == 0


def test_a_refused_direct_write_goes_buffered_and_the_sink_stays_buffered(
    two_fds: tuple[int, int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file system wanting a bigger alignment than ours refuses the write with EINVAL.
    fd, direct_fd, path = two_fds
    real = os.pwrite

    def refusing(target: int, chunk: memoryview, offset: int) -> int:
        if target == direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(target, chunk, offset)

    monkeypatch.setattr(libc.os, "pwrite", refusing)
    first, second = os.urandom(2 * BLOCK), os.urandom(BLOCK)
    sink = libc.PartSink(fd, direct_fd)
    sink.write(aligned(first), 0)
    sink.write(aligned(second), 2 * BLOCK)
    assert path.read_bytes() == first + second
    assert sink.direct_fd == -1 and sink.direct_bytes == 0
    assert sink.direct_refused is not None and sink.direct_refused.errno == errno.EINVAL


def test_other_direct_write_errors_are_raised(
    two_fds: tuple[int, int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, direct_fd, _ = two_fds

    def full(target: int, chunk: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(libc.os, "pwrite", full)
    with pytest.raises(OSError, match="No space left"):
        libc.PartSink(fd, direct_fd).write(aligned(os.urandom(BLOCK)), 0)


def test_open_direct_without_o_direct_or_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with monkeypatch.context() as patched:
            patched.delattr(libc.os, "O_DIRECT")  # not Linux
            assert libc.open_direct(fd) == -1
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError) as raised:  # closed: no /proc/self/fd entry to reopen
        libc.open_direct(fd)
    assert raised.value.errno in libc.DIRECT_UNSUPPORTED


def test_buffers_start_on_a_block_as_o_direct_wants() -> None:
    for size in (BLOCK, 3 * BLOCK, 1024 * 1024):
        buffer = libc.aligned_buffer(size)
        assert len(buffer) == size
        assert ctypes.addressof(ctypes.c_char.from_buffer(buffer)) % BLOCK == 0


class _Collect:
    def __init__(self, into: bytearray) -> None:
        self.into = into

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.into += data


def test_preallocate_reserves_the_blocks_and_the_size(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        libc.preallocate(fd, 3 * 1024 * 1024 + 5)
        stat = os.fstat(fd)
    finally:
        os.close(fd)
    assert stat.st_size == 3 * 1024 * 1024 + 5
    assert stat.st_blocks * 512 >= stat.st_size  # allocated, not a sparse file
    assert path.read_bytes() == bytes(stat.st_size)


def test_preallocate_beyond_what_may_be_stored_is_an_error_before_any_byte(
    tmp_path: Path,
) -> None:
    # A file size limit (RLIMIT_FSIZE) refuses it as a full disk or quota would: at once.
    script = f"""
import errno, os, resource, signal
from hpcstage.store import libc
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
fd = os.open({str(tmp_path / "f")!r}, os.O_RDWR | os.O_CREAT, 0o600)
try:
    libc.preallocate(fd, 8 << 20)
except OSError as exc:
    print(errno.errorcode[exc.errno], exc.strerror, os.fstat(fd).st_size)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.split()[0] == "EFBIG"
    assert "(reserving 8388608 bytes for a download)" in out
    assert out.split()[-1] == "0"  # nothing was written


def test_preallocate_where_the_file_system_cannot_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(libc, "_FALLOCATE", unsupported)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        libc.preallocate(fd, 1 << 20)
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)

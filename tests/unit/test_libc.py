"""hpcstage.libc.pwrite_all: every byte lands at its offset, in slices, short writes or not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcstage import libc


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

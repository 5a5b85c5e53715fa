"""hpcstage.store.parts.InOrderHash: a multipart download's MD5/SHA, read back in file order while
the parts land out of order, following the part being hashed as its bytes land.

Real files and real hashes; the "download" is this test writing the parts' bytes and
reporting them the way the ranged GETs do (each part front to back, progress as it goes).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from hpcstage.errors import TransientStoreError
from hpcstage.store import parts as parts_module
from hpcstage.store.parts import InOrderHash, Part, split_parts

PART = 64 * 1024
DATA = hashlib.sha256(b"seed").digest() * (3 * PART // 32 + 100)  # 3 parts and a bit
PARTS = split_parts(len(DATA), PART)
DATA_MD5 = hashlib.md5(DATA, usedforsecurity=False).hexdigest()
URL = "s3://b/k"


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    handle = os.open(tmp_path / "object", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        yield handle
    finally:
        os.close(handle)


def write(fd: int, part: Part, upto: int, data: bytes = DATA) -> None:
    os.pwrite(fd, data[part.offset : part.offset + upto], part.offset)


async def land_all(fd: int, hasher: InOrderHash, parts: Iterable[Part] = PARTS) -> None:
    """Write every part whole, report it, and wait for the hashing to finish."""
    for part in parts:
        write(fd, part, part.length)
        hasher.part_done(part)
    await hasher.finish(URL)


async def settle() -> None:
    for _ in range(20):  # let the hashing task and its threads run
        await asyncio.sleep(0.01)


def test_parts_landing_out_of_order_are_hashed_in_order(fd: int) -> None:
    assert len(PARTS) == 4

    async def main() -> str:
        md5 = hashlib.md5(usedforsecurity=False)
        hasher = InOrderHash(fd, PARTS, [md5])
        await land_all(fd, hasher, reversed(PARTS))
        return md5.hexdigest()

    assert asyncio.run(main()) == DATA_MD5


def test_the_part_being_hashed_is_followed_as_its_bytes_land(
    fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[tuple[int, int]] = []
    real = parts_module.InOrderHash._hash

    def recording(self: InOrderHash, hasher: object, offset: int, length: int) -> None:
        reads.append((offset, length))
        real(self, hasher, offset, length)

    monkeypatch.setattr(parts_module.InOrderHash, "_hash", recording)

    async def main() -> tuple[str, list[tuple[int, int]]]:
        md5 = hashlib.md5(usedforsecurity=False)
        hasher = InOrderHash(fd, PARTS, [md5])
        first = PARTS[0]
        write(fd, first, 1000)
        hasher.landed(1, 1000)  # the first 1000 bytes of the first part: hashed already
        await settle()
        seen = list(reads)
        await land_all(fd, hasher)
        return md5.hexdigest(), seen

    digest, before_the_rest = asyncio.run(main())
    assert before_the_rest == [(0, 1000)]
    assert reads[1] == (1000, PART - 1000)  # then the rest of that part, from where it was
    assert sum(length for _, length in reads) == len(DATA)
    assert digest == DATA_MD5


def test_a_part_fetched_again_after_being_hashed_fails_the_object(fd: int) -> None:
    async def main() -> None:
        hasher = InOrderHash(fd, PARTS, [hashlib.md5(usedforsecurity=False)])
        write(fd, PARTS[0], 1000)
        hasher.landed(1, 1000)
        await settle()
        hasher.restart(1)  # the SDK's retry rewrites bytes that were already hashed
        await land_all(fd, hasher)

    with pytest.raises(TransientStoreError, match="part 1 was fetched again"):
        asyncio.run(main())


def test_a_part_fetched_again_before_it_was_reached_is_fine(fd: int) -> None:
    async def main() -> str:
        md5 = hashlib.md5(usedforsecurity=False)
        hasher = InOrderHash(fd, PARTS, [md5])
        # Part 3's first attempt wrote garbage and broke off; the retry writes it again.
        third = PARTS[2]
        write(fd, third, 5000, data=bytes(len(DATA)))
        hasher.landed(3, 5000)
        hasher.restart(3)
        await land_all(fd, hasher)
        return md5.hexdigest()

    assert asyncio.run(main()) == DATA_MD5


def test_without_hashers_only_whole_parts_start_their_writeback(
    fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(
        parts_module, "start_writeback", lambda _fd, off, n: started.append((off, n))
    )

    async def main() -> None:
        hasher = InOrderHash(fd, PARTS, [])
        hasher.landed(1, 1000)  # a progress report: nothing to do yet
        await settle()
        assert started == []
        for part in PARTS:
            hasher.part_done(part)
        await hasher.finish(URL)
        hasher.restart(1)  # nothing was read: no reason to fetch the object again
        await hasher.finish(URL)

    asyncio.run(main())
    assert started == [(p.offset, p.length) for p in PARTS]


def test_without_writeback_hints_nothing_starts_writeback_and_finish_returns(
    fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An agent whose cache is readable before durable gives no hints: they slowed a 1 GiB
    # download from 0.9 s to 1.5-2.0 s on this week's kernel (docs/benchmarks.md).
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(
        parts_module, "start_writeback", lambda _fd, off, n: started.append((off, n))
    )

    async def main() -> None:
        hasher = InOrderHash(fd, PARTS, [], writeback=False)
        for part in PARTS:
            hasher.part_done(part)
        await asyncio.wait_for(hasher.finish(URL), 5)

    asyncio.run(main())
    assert started == []

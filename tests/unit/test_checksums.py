"""Store checksums: known check values, incremental use, and what a store's answer offers."""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import random
import zlib

import pytest

from hpcstage.cache.commit import GROUP_COMMIT_MAX
from hpcstage.store import checksums
from hpcstage.store.checksums import StoreChecksum, from_response
from hpcstage.store.protocol import LEAN_MAX


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# The catalogued check values (CRC of the ASCII bytes "123456789").
CHECK = b"123456789"
KNOWN = {
    "crc64nvme": b64(0xAE8B14860A799888.to_bytes(8, "big")),
    "crc32c": b64(0xE3069283.to_bytes(4, "big")),
    "crc32": b64(0xCBF43926.to_bytes(4, "big")),
    "sha1": b64(hashlib.sha1(CHECK).digest()),  # noqa: S324 - S3's algorithm, not ours
    "sha256": b64(hashlib.sha256(CHECK).digest()),
}


@pytest.mark.parametrize("algorithm", checksums.ALGORITHMS)
def test_check_values(algorithm: str) -> None:
    assert checksums.compute(algorithm, CHECK) == KNOWN[algorithm]


@pytest.mark.parametrize("algorithm", checksums.ALGORITHMS)
def test_updates_in_pieces_equal_one_pass(algorithm: str) -> None:
    data = os.urandom(3 * 65536 + 17)
    running = checksums.new(algorithm)
    for start in range(0, len(data), 65536):
        running.update(memoryview(data)[start : start + 65536])
    assert running.value() == checksums.compute(algorithm, data)
    assert checksums.compute(algorithm, data) != checksums.compute(algorithm, data[:-1])


def test_crc32_is_zlibs() -> None:
    data = os.urandom(1000)
    assert checksums.compute("crc32", data) == b64(zlib.crc32(data).to_bytes(4, "big"))


def test_unknown_algorithm_is_named() -> None:
    with pytest.raises(ValueError, match="unknown checksum algorithm 'md4'"):
        checksums.new("md4")


def test_the_fastest_full_object_checksum_is_chosen() -> None:
    answer = {
        "ChecksumSHA256": KNOWN["sha256"],
        "ChecksumCRC32C": KNOWN["crc32c"],
        "ChecksumType": "FULL_OBJECT",
    }
    assert from_response(answer) == StoreChecksum("crc32c", KNOWN["crc32c"])
    assert from_response({"ChecksumCRC64NVME": KNOWN["crc64nvme"]}) == StoreChecksum(
        "crc64nvme", KNOWN["crc64nvme"]
    )
    assert str(StoreChecksum("crc32", KNOWN["crc32"])) == f"CRC32 {KNOWN['crc32']}"


def test_composite_missing_and_malformed_checksums_offer_nothing() -> None:
    assert from_response({}) is None
    assert from_response({"ETag": '"abc"', "ContentLength": 3}) is None
    # A multipart upload's checksum of part checksums says nothing about the whole bytes.
    assert from_response({"ChecksumCRC32": KNOWN["crc32"] + "-3"}) is None
    assert from_response({"ChecksumCRC32": KNOWN["crc32"], "ChecksumType": "COMPOSITE"}) is None
    # Garbage or a digest of the wrong width is skipped, not trusted and not fatal.
    assert from_response({"ChecksumCRC64NVME": "not base64!"}) is None
    assert from_response({"ChecksumCRC64NVME": KNOWN["crc32"]}) is None
    assert from_response({"ChecksumCRC64NVME": 12345}) is None
    # ... and the next usable one is taken instead.
    answer = {"ChecksumCRC64NVME": "%%%", "ChecksumSHA1": KNOWN["sha1"]}
    assert from_response(answer) == StoreChecksum("sha1", KNOWN["sha1"])


def test_every_object_the_cache_commits_in_groups_gets_a_sha256() -> None:
    # Downloads record a SHA-256 up to LEAN_MAX; the cache requires one up to GROUP_COMMIT_MAX
    # (peer copy verifies it). The first must cover the second.
    assert GROUP_COMMIT_MAX <= LEAN_MAX


COMBINABLE = [a for a in checksums.ALGORITHMS if checksums.combinable(a)]


def test_the_crcs_are_combinable_and_the_hashes_not() -> None:
    assert COMBINABLE == ["crc64nvme", "crc32c", "crc32"]
    with pytest.raises(ValueError, match="sha256 values cannot be combined"):
        checksums.PartChecksums("sha256", [10])


@pytest.mark.parametrize("algorithm", COMBINABLE)
@pytest.mark.parametrize("seed", range(5))
def test_parts_checksummed_in_any_order_combine_into_the_whole(algorithm: str, seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 - reproducible test data
    data = rng.randbytes(rng.randrange(1, 300_000))
    cuts = sorted(
        {0, len(data), *(rng.randrange(1, len(data) + 1) for _ in range(rng.randrange(5)))}
    )
    lengths = [b - a for a, b in itertools.pairwise(cuts)]
    sums = checksums.PartChecksums(algorithm, lengths)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    for index in order:
        sums.part(index).update(data[cuts[index] : cuts[index + 1]])
    assert sums.value() == checksums.compute(algorithm, data)


def test_a_part_checksummed_again_counts_only_its_last_attempt() -> None:
    data = os.urandom(10_000)
    sums = checksums.PartChecksums("crc64nvme", [4000, 6000])
    sums.part(0).update(data[:4000])
    sums.part(1).update(b"half of a first attempt that broke off")
    sums.part(1).update(data[4000:])  # a fresh checksummer: the broken attempt is forgotten
    assert sums.value() == checksums.compute("crc64nvme", data)


def test_a_part_without_a_checksum_is_an_error_not_a_wrong_value() -> None:
    sums = checksums.PartChecksums("crc32c", [5, 5])
    sums.part(1).update(b"12345")
    with pytest.raises(ValueError, match="no checksum of part 0"):
        sums.value()
    with pytest.raises(IndexError):
        sums.part(2)

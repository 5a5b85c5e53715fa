"""Full-object checksums that an S3 store keeps beside an object, and computing them.

S3 can keep a checksum of the whole object besides its ETag: CRC64NVME (which AWS S3 computes
for every object written since 2025), CRC32C, CRC32, SHA-1 or SHA-256. ``HeadObject`` with
``ChecksumMode=ENABLED`` returns it (``ChecksumCRC64NVME`` ..., ``ChecksumType``). hpcstage
verifies a big download against it when the store has one: a CRC costs about 0.1 s of CPU per
GiB where an MD5, the only other content check a plain ETag allows, costs about 1.5 s and
runs on one core per object. A *composite* checksum (a multipart upload's checksum of part
checksums, shown as ``"...-N"``) says nothing about the whole bytes and is ignored, like a
multipart ETag.

CRC32C and CRC64NVME come from ``awscrt`` (hardware-accelerated, releases the GIL); CRC32
from zlib; SHA-1 and SHA-256 from hashlib. Values are base64 of the big-endian digest, as S3
sends them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from awscrt import checksums as _crt

# Fastest first: when a store keeps several, the cheapest one is checked.
ALGORITHMS: Final = ("crc64nvme", "crc32c", "crc32", "sha1", "sha256")
_FIELDS: Final = {
    "crc64nvme": "ChecksumCRC64NVME",
    "crc32c": "ChecksumCRC32C",
    "crc32": "ChecksumCRC32",
    "sha1": "ChecksumSHA1",
    "sha256": "ChecksumSHA256",
}
_DIGEST_BYTES: Final = {"crc64nvme": 8, "crc32c": 4, "crc32": 4, "sha1": 20, "sha256": 32}


class Checksummer(Protocol):
    """A running checksum: ``update`` with the bytes in order, then ``value``."""

    def update(self, data: bytes | bytearray | memoryview) -> None: ...

    def value(self) -> str:
        """The checksum as S3 shows it: base64 of the big-endian digest."""
        ...


class _Crc:
    def __init__(self, fn: Callable[[Any, int], int], width: int) -> None:
        self._fn = fn
        self._width = width
        self._crc = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._crc = self._fn(data, self._crc)

    def value(self) -> str:
        return base64.b64encode(self._crc.to_bytes(self._width, "big")).decode()


class _Hash:
    def __init__(self, name: str) -> None:
        self._hash = hashlib.new(name)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)

    def value(self) -> str:
        return base64.b64encode(self._hash.digest()).decode()


def _zlib_crc32(data: Any, previous: int) -> int:
    return zlib.crc32(data, previous)


def new(algorithm: str) -> Checksummer:
    """A fresh checksummer for one of ``ALGORITHMS``."""
    if algorithm == "crc64nvme":
        return _Crc(_crt.crc64nvme, 8)
    if algorithm == "crc32c":
        return _Crc(_crt.crc32c, 4)
    if algorithm == "crc32":
        return _Crc(_zlib_crc32, 4)
    if algorithm in ("sha1", "sha256"):
        return _Hash(algorithm)
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")


def compute(algorithm: str, data: bytes | bytearray | memoryview) -> str:
    """The checksum of ``data`` in one call."""
    checksummer = new(algorithm)
    checksummer.update(data)
    return checksummer.value()


def field(algorithm: str) -> str:
    """The request/response member carrying ``algorithm``'s value (``ChecksumCRC64NVME``)."""
    return _FIELDS[algorithm]


@dataclass(frozen=True)
class StoreChecksum:
    """A full-object checksum the store keeps for one object version."""

    algorithm: str
    value: str

    def __str__(self) -> str:
        return f"{self.algorithm.upper()} {self.value}"

    def new(self) -> Checksummer:
        return new(self.algorithm)


def _well_formed(algorithm: str, value: str) -> bool:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False  # a composite "...-N" lands here too
    return len(raw) == _DIGEST_BYTES[algorithm]


def from_response(answer: Mapping[str, Any]) -> StoreChecksum | None:
    """The fastest full-object checksum in a HeadObject/GetObject answer, or None.

    None when the store keeps none, only a composite one, or one that is not a well-formed
    digest of its algorithm (a server echoing garbage must not fail every download: the
    download is then checked as if the store had no checksum).
    """
    kind = answer.get("ChecksumType")
    if isinstance(kind, str) and kind.upper() != "FULL_OBJECT":
        return None
    for algorithm in ALGORITHMS:
        value = answer.get(_FIELDS[algorithm])
        if isinstance(value, str) and _well_formed(algorithm, value):
            return StoreChecksum(algorithm, value)
    return None

"""Full-object checksums that an S3 store keeps beside an object, and computing them.

S3 can keep a checksum of the whole object besides its ETag: CRC64NVME (which AWS S3 computes
for every object written since 2025), CRC32C, CRC32, SHA-1 or SHA-256. ``HeadObject`` with
``ChecksumMode=ENABLED`` returns it (``ChecksumCRC64NVME`` ..., ``ChecksumType``). hpcstage
verifies a big download against it when the store has one: a CRC costs a small fraction of
the CPU of an MD5, the only other content check a plain ETag allows, which also runs on one
core per object (MD5 is sequential; figures in docs/benchmarks.md, "What changed since the
first run", item 8). A *composite* checksum (a multipart upload's checksum of part
checksums, shown as ``"...-N"``) says nothing about the whole bytes and is ignored, like a
multipart ETag.

CRC32C and CRC64NVME come from ``awscrt`` (hardware-accelerated, releases the GIL); CRC32
from zlib; SHA-1 and SHA-256 from hashlib. Values are base64 of the big-endian digest, as S3
sends them.

A CRC of a whole object can be put together from the CRCs of its parts and their lengths
(``PartChecksums``): the parts of a big download are checksummed as their bytes arrive, in any
order, and nothing is read back. The hashes cannot be combined that way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import zlib
from collections.abc import Callable, Mapping, Sequence
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
    def __init__(self, fn: Callable[[Any, int], int], width: int, crc: int = 0) -> None:
        self._fn = fn
        self._width = width
        self.crc = crc

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.crc = self._fn(data, self.crc)

    def value(self) -> str:
        return base64.b64encode(self.crc.to_bytes(self._width, "big")).decode()


class _Hash:
    def __init__(self, name: str) -> None:
        self._hash = hashlib.new(name)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)

    def value(self) -> str:
        return base64.b64encode(self._hash.digest()).decode()


def _zlib_crc32(data: Any, previous: int) -> int:
    return zlib.crc32(data, previous)


_CRCS: Final[dict[str, tuple[Callable[[Any, int], int], int]]] = {
    "crc64nvme": (_crt.crc64nvme, 8),
    "crc32c": (_crt.crc32c, 4),
    "crc32": (_zlib_crc32, 4),  # the same CRC-32 as awscrt's (zlib's is at hand)
}
# combine(crc_a, crc_b, len_b) = the CRC of a's bytes then b's (awscrt 0.31 and later).
_COMBINE: Final[dict[str, Callable[[int, int, int], int]]] = {
    "crc64nvme": _crt.combine_crc64nvme,
    "crc32c": _crt.combine_crc32c,
    "crc32": _crt.combine_crc32,
}


def new(algorithm: str) -> Checksummer:
    """A fresh checksummer for one of ``ALGORITHMS``."""
    if algorithm in _CRCS:
        return _Crc(*_CRCS[algorithm])
    if algorithm in ("sha1", "sha256"):
        return _Hash(algorithm)
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")


def combinable(algorithm: str) -> bool:
    """Whether ``algorithm``'s value over a whole object can be made from its parts' values."""
    return algorithm in _COMBINE


class PartChecksums:
    """The checksum of an object whose parts (``lengths``, in order) arrive in any order.

    ``part(i)`` hands out a fresh checksummer for part ``i`` each time it is called, so a part
    fetched again after a failure is checksummed again from its first byte; the last one
    handed out for each part counts. ``value()`` combines them once every part has been given
    its bytes. Only for ``combinable`` algorithms.
    """

    def __init__(self, algorithm: str, lengths: Sequence[int]) -> None:
        if not combinable(algorithm):
            raise ValueError(f"{algorithm} values cannot be combined from parts")
        self.algorithm = algorithm
        self._lengths = list(lengths)
        self._parts: dict[int, _Crc] = {}

    def part(self, index: int) -> Checksummer:
        """A fresh checksummer for part ``index`` (0-based), replacing any earlier one."""
        if not 0 <= index < len(self._lengths):
            raise IndexError(f"part {index} of {len(self._lengths)}")
        fn, width = _CRCS[self.algorithm]
        self._parts[index] = crc = _Crc(fn, width)
        return crc

    def value(self) -> str:
        """The whole object's checksum, as S3 shows it."""
        missing = [i for i in range(len(self._lengths)) if i not in self._parts]
        if missing:
            raise ValueError(f"no checksum of part {missing[0]} yet")
        combine = _COMBINE[self.algorithm]
        whole = 0
        for index, length in enumerate(self._lengths):
            crc = self._parts[index].crc
            whole = crc if index == 0 else combine(whole, crc, length)
        fn, width = _CRCS[self.algorithm]
        return _Crc(fn, width, whole).value()


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

"""How a download's bytes are checked: the store's checksum, else a plain-MD5 ETag, and a
SHA-256 of small objects (see hpcstage.store.protocol, "Verification")."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from hpcstage.core.identity import ObjectRef
from hpcstage.errors import TransientStoreError
from hpcstage.store import checksums
from hpcstage.store.checksums import StoreChecksum
from hpcstage.store.parts import Part
from hpcstage.store.protocol import LEAN_MAX, DownloadResult

PLAIN_MD5: Final = re.compile(r"[0-9a-fA-F]{32}")


_OPAQUE_SSE: Final = frozenset({"aws:kms", "aws:kms:dsse"})  # their ETags are no MD5 (nor SSE-C's)


def etag_is_md5(etag: str, answer: Mapping[str, Any]) -> bool:
    """True when ``etag`` in a HEAD/PUT ``answer`` is the MD5 of the bytes: a plain 32-hex ETag
    of an object not encrypted with SSE-KMS or SSE-C (those look like MD5s but are not)."""
    if answer.get("ServerSideEncryption") in _OPAQUE_SSE or answer.get("SSECustomerAlgorithm"):
        return False
    return bool(PLAIN_MD5.fullmatch(etag))


def new_md5() -> Any:
    """A fresh MD5 (of bytes to compare with an ETag or send as Content-MD5)."""
    # MD5 only checks S3's ETag, it protects nothing, hence usedforsecurity=False (FIPS hosts).
    return hashlib.md5(usedforsecurity=False)


def md5_contradicts(etag: str, md5_hex: str) -> bool:
    """True if ``etag`` is a plain MD5 (no '-': not multipart) other than ``md5_hex``."""
    return bool(PLAIN_MD5.fullmatch(etag)) and etag.lower() != md5_hex


def check_md5(url: str, etag: str, md5_hex: str) -> None:
    """A plain-MD5 ETag (no '-': not multipart) must equal the MD5 of the bytes."""
    if md5_contradicts(etag, md5_hex):
        raise TransientStoreError(f"{url}: checksum mismatch (ETag {etag}, bytes have {md5_hex})")


@dataclass
class Checks:
    """The running checksums of one download, chosen by what the store can confirm."""

    ref: ObjectRef
    stored: StoreChecksum | None  # the store's full-object checksum, if it keeps one
    store: checksums.Checksummer | None  # computing it over the bytes
    md5: Any | None  # when the ETag is a plain MD5 and the store keeps no checksum
    sha256: Any | None  # recorded for objects up to LEAN_MAX
    parts: checksums.PartChecksums | None = None  # the store's checksum, part by part

    @classmethod
    def choose(cls, ref: ObjectRef, stored: StoreChecksum | None, md5_etag: bool = True) -> Checks:
        """``md5_etag`` False: the object's ETag is no MD5 although it may look like one
        (SSE-KMS, SSE-C: see ``etag_is_md5``)."""
        md5 = stored is None and md5_etag and PLAIN_MD5.fullmatch(ref.etag)
        return cls(
            ref,
            stored,
            store=stored.new() if stored is not None else None,
            md5=new_md5() if md5 else None,
            sha256=hashlib.sha256() if ref.size <= LEAN_MAX else None,
        )

    def hashers(self) -> list[Any]:
        """The running checksums that must see every byte (each has ``update``)."""
        return [h for h in (self.md5, self.store, self.sha256) if h is not None]

    @property
    def in_order(self) -> bool:
        """Whether what must be computed has to see the bytes in file order: an MD5 (of a
        single-PUT ETag), a SHA, or a store checksum that cannot be combined from parts.
        Else (nothing to compute, or a CRC the store keeps) a multipart download is checked
        part by part as its bytes arrive, in any order."""
        if self.md5 is not None or self.sha256 is not None:
            return True
        return self.stored is not None and not checksums.combinable(self.stored.algorithm)

    def check_by_parts(self, parts: Sequence[Part]) -> None:
        """Check the store's checksum (if any) part by part (``part``); not when ``in_order``."""
        if self.stored is not None:
            self.parts = checksums.PartChecksums(self.stored.algorithm, [p.length for p in parts])

    def part(self, part: Part) -> checksums.Checksummer | None:
        """A fresh checksum of ``part``'s bytes (None: none to compute), for each attempt."""
        return self.parts.part(part.number - 1) if self.parts is not None else None

    def verify(self, url: str) -> DownloadResult:
        """Compare with what the store said; TransientStoreError on a mismatch."""
        ref, stored, verified = self.ref, self.stored, ""
        if self.store is not None and stored is not None:
            got = self.parts.value() if self.parts is not None else self.store.value()
            if got != stored.value:
                raise TransientStoreError(
                    f"{url}: checksum mismatch (the store keeps {stored},"
                    f" the bytes have {stored.algorithm.upper()} {got})"
                )
            verified = stored.algorithm
        elif self.md5 is not None:
            check_md5(url, ref.etag, self.md5.hexdigest())
            verified = "md5"
        sha256 = self.sha256.hexdigest() if self.sha256 is not None else ""
        return DownloadResult(sha256, ref.size, verified)

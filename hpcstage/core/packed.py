"""The packed dataset format's pure rules (docs/packed-datasets.md): where each part lives
under a dataset's prefix, what a version record holds, which member paths are safe, how a tar
member's header is built, which rows a subtree selects, and which byte ranges of a segment a
selection needs.

A dataset ``NAME.hpack/`` holds plain tar files (``segments/``), one Parquet manifest per version
(``manifests/``) and one JSON record per version (``versions/``), written last: a version exists
exactly when its record does, so a reader never sees a half-written one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from hpcstage.errors import PackError

FORMAT = "hpack/1"
SUFFIX = ".hpack"
VERSIONS = "versions/"
MANIFESTS = "manifests/"
SEGMENTS = "segments/"
WORK = "_pack/"  # a pack in progress: its listing and the manifests of finished segments

BLOCK = 512  # tar's block: headers and data are padded to it
MAX_VERSION = 99_999_999  # eight digits, so that names sort as numbers
MAX_MEMBER_BYTES = 4096  # a member path, in UTF-8 (PATH_MAX)
MAX_NAME_BYTES = 255  # one component (NAME_MAX)
DEFAULT_SEGMENT_SIZE = 256 * 2**20
DEFAULT_ROW_GROUP = 32_768  # rows: a 1% subtree of 10^7 rows touches ~4 row groups
# A selected span of a segment is fetched as one ranged GET unless the gap between two
# selected members exceeds this: a GET costs about as much as this many bytes on a LAN.
RANGE_GAP = 1 * 2**20

_VERSION_NAME = re.compile(r"(\d{8})\.json")
_SEGMENT_NAME = re.compile(r"\d{8}-\d{5}-\d{6}\.tar")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# -- names ------------------------------------------------------------------------------------


def version_key(version: int) -> str:
    """The record of ``version``, relative to the dataset's prefix."""
    _check_version(version)
    return f"{VERSIONS}{version:08d}.json"


def manifest_key(version: int) -> str:
    """The Parquet manifest of ``version``, relative to the dataset's prefix."""
    _check_version(version)
    return f"{MANIFESTS}{version:08d}.parquet"


def segment_name(version: int, slice_no: int, seq: int) -> str:
    """The name of a segment: the version that wrote it, its slice of the listing, its place in
    the slice. Deterministic, so a resumed pack writes the same names (and skips done ones)."""
    _check_version(version)
    if not (0 <= slice_no < 100_000 and 0 <= seq < 1_000_000):
        raise PackError(f"segment number out of range: slice {slice_no}, segment {seq}")
    return f"{version:08d}-{slice_no:05d}-{seq:06d}.tar"


def segment_key(name: str) -> str:
    """Where the segment ``name`` lives, relative to the dataset's prefix."""
    if not _SEGMENT_NAME.fullmatch(name):
        raise PackError(f"not a segment name: {name!r}")
    return SEGMENTS + name


def version_of_key(rel_key: str) -> int | None:
    """The version a key under ``versions/`` records, or None for anything else."""
    if not rel_key.startswith(VERSIONS):
        return None
    match = _VERSION_NAME.fullmatch(rel_key[len(VERSIONS) :])
    return int(match.group(1)) if match else None


def _check_version(version: int) -> None:
    if not 1 <= version <= MAX_VERSION:
        raise PackError(f"a version is a number from 1 to {MAX_VERSION}, not {version}")


def is_dataset_key(key: str) -> bool:
    """True when an S3 key names a packed dataset or something inside one: a component
    ending in ``.hpack``, or ``.hpack@N`` (a pinned version)."""
    return any(
        name.endswith(SUFFIX) and len(name) > len(SUFFIX)
        for name in (part.partition("@")[0] for part in key.split("/"))
    )


@dataclass(frozen=True)
class DatasetRef:
    """A packed dataset as a directive names it: ``.../NAME.hpack[@VERSION]/[SUBTREE/]``.

    ``prefix`` is the dataset's key prefix (ending in ``.hpack/``), ``version`` None for the
    newest, ``subtree`` "" for everything or a directory path ending in "/".
    """

    prefix: str
    version: int | None = None
    subtree: str = ""

    @classmethod
    def parse(cls, key: str) -> DatasetRef:
        """Split a key such as ``lib/ligands.hpack@3/set1/`` (PackError if it is none)."""
        parts = key.split("/")
        for i, part in enumerate(parts):
            name, at, pinned = part.partition("@")
            if not name.endswith(SUFFIX) or len(name) == len(SUFFIX):
                continue
            version = None
            if at:
                if not pinned.isdigit():
                    raise PackError(f"{part!r}: a pinned version is @ and a number, as @3")
                version = int(pinned)
                _check_version(version)
            rest = "/".join(parts[i + 1 :])
            subtree = check_subtree(rest)
            return cls("/".join([*parts[:i], name]) + "/", version, subtree)
        raise PackError(f"{key!r} names no packed dataset (a path component ending in {SUFFIX})")

    def key(self) -> str:
        """The key as written, version pinned or not."""
        pin = f"@{self.version}" if self.version is not None else ""
        return f"{self.prefix[:-1]}{pin}/{self.subtree}"

    def pinned(self, version: int) -> DatasetRef:
        """This selection at ``version``."""
        return DatasetRef(self.prefix, version, self.subtree)


# -- member paths -----------------------------------------------------------------------------


def check_member_path(path: str) -> str:
    """Return ``path`` if it is safe to create below a directory, else raise PackError.

    Relative, '/'-separated, no empty, '.' or '..' component, no NUL, at most NAME_MAX bytes per
    component and PATH_MAX in all. A manifest is read from a store anyone with write access can
    change: every path is checked again before a file is created from it.
    """
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise PackError(f"member path {path!r} is not valid UTF-8") from None
    problem = ""
    if not path or path.startswith("/") or path.endswith("/"):
        problem = "must be a relative path to a file"
    elif "\0" in path:
        problem = "holds a NUL byte"
    elif len(raw) > MAX_MEMBER_BYTES:
        problem = f"is longer than {MAX_MEMBER_BYTES} bytes"
    else:
        for part in path.split("/"):
            if part in ("", ".", ".."):
                problem = "has an empty, '.' or '..' component"
                break
            if len(part.encode()) > MAX_NAME_BYTES:
                problem = f"has a component longer than {MAX_NAME_BYTES} bytes"
                break
    if problem:
        raise PackError(f"member path {path[:200]!r} {problem}")
    return path


def check_subtree(subtree: str) -> str:
    """A selection: "" (everything) or a directory path, returned ending in "/"."""
    if subtree in ("", "/"):
        return ""
    stripped = subtree.rstrip("/")
    check_member_path(stripped)
    return stripped + "/"


def subtree_bounds(subtree: str) -> tuple[str, str | None]:
    """The path range ``low <= path < high`` a subtree selects (high None: no upper bound).

    Paths sort by code point, which is UTF-8 byte order (Parquet's statistics order), and every
    path under ``d/`` lies between ``d/`` and ``d0`` ('0' follows '/').
    """
    subtree = check_subtree(subtree)
    if not subtree:
        return "", None
    return subtree, subtree[:-1] + "0"


def sort_key(name: str, is_dir: bool) -> str:
    """How a directory walk orders one directory's entries so the paths it yields come out
    sorted as whole strings: a directory sorts as its name plus '/', since every path below it
    starts so (``a.txt`` before ``a/x``: '.' < '/')."""
    return name + "/" if is_dir else name


# -- tar members ------------------------------------------------------------------------------


def padded(size: int) -> int:
    """``size`` rounded up to whole tar blocks."""
    return -(-size // BLOCK) * BLOCK


def tar_header(path: str, size: int, mode: int, mtime: int) -> bytes:
    """The header block(s) of one regular-file member: ustar, with a pax extended header in
    front when the path or size does not fit ustar's fields, so that GNU tar, bsdtar and
    Python's tarfile all read the segment."""
    raw = path.encode()
    split = _ustar_split(raw)
    pax: dict[str, str] = {}
    if split is None:
        pax["path"] = path
        split = (b"", raw[-100:].lstrip(b"/")[:100] or b"x")
    if size >= 8**11:
        pax["size"] = str(size)
    header = _ustar(split, 0 if "size" in pax else size, mode, mtime, b"0")
    if not pax:
        return header
    body = b"".join(_pax_record(k, v) for k, v in pax.items())
    extended = _ustar((b"", b"././@PaxHeader"), len(body), 0o644, mtime, b"x")
    return extended + body + b"\0" * (padded(len(body)) - len(body)) + header


def _ustar_split(raw: bytes) -> tuple[bytes, bytes] | None:
    if len(raw) <= 100:
        return b"", raw
    for i in range(len(raw) - 1, 0, -1):
        if raw[i : i + 1] == b"/" and i <= 155 and len(raw) - i - 1 <= 100:
            return raw[:i], raw[i + 1 :]
    return None


def _ustar(name: tuple[bytes, bytes], size: int, mode: int, mtime: int, kind: bytes) -> bytes:
    prefix, base = name
    block = bytearray(BLOCK)
    block[0 : len(base)] = base
    block[100:108] = b"%07o\0" % (mode & 0o7777)
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % max(0, min(mtime, 8**11 - 1))
    block[148:156] = b"        "
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[345 : 345 + len(prefix)] = prefix
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body)
    while len(str(length).encode()) + len(body) != length:
        length = len(str(length).encode()) + len(body)
    return str(length).encode() + body


END_OF_ARCHIVE = b"\0" * (2 * BLOCK)


# -- which bytes a selection needs --------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """Bytes ``[start, end)`` of one segment, fetched with one ranged GET."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def spans(members: Iterable[tuple[int, int]], gap: int = RANGE_GAP) -> list[Span]:
    """The ranged GETs that fetch the members ``(offset, size)`` of one segment: members closer
    than ``gap`` bytes share a GET (the bytes between are cheaper than another request)."""
    out: list[Span] = []
    for offset, size in sorted(members):
        end = offset + size
        if out and offset - out[-1].end <= gap:
            if end > out[-1].end:
                out[-1] = Span(out[-1].start, end)
        else:
            out.append(Span(offset, end))
    return out


# -- the version record -----------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentInfo:
    """One segment as a version's record lists it."""

    name: str
    size: int
    sha256: str
    files: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "files": self.files}


@dataclass(frozen=True)
class VersionInfo:
    """``versions/NNNNNNNN.json``: what one version of a dataset holds.

    ``segments`` lists every segment the manifest points into (a version made by ``--update``
    keeps pointing into its parents' segments for the files that did not change).
    """

    version: int
    created: str  # ISO 8601, UTC
    files: int
    size: int  # bytes of all files
    manifest: str  # relative key
    manifest_size: int
    manifest_sha256: str
    segments: tuple[SegmentInfo, ...]
    parent: int | None = None
    source: str = ""  # what was packed, for people reading the record
    format: str = FORMAT
    # Who wrote it, when a packed stage-out did ("job 123@1700000000 out 0"): how a retried
    # stage-out finds the version it made already. Not in the record when empty.
    writer: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def segment(self, name: str) -> SegmentInfo:
        """The record of segment ``name`` (PackError: the manifest names a segment the version
        does not list)."""
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise PackError(f"version {self.version} lists no segment {name!r}")

    def to_json(self) -> str:
        doc = {
            "format": self.format,
            "version": self.version,
            "created": self.created,
            "files": self.files,
            "bytes": self.size,
            "manifest": self.manifest,
            "manifest_size": self.manifest_size,
            "manifest_sha256": self.manifest_sha256,
            "parent": self.parent,
            "source": self.source,
            "segments": [s.to_json() for s in self.segments],
        }
        if self.writer:
            doc["writer"] = self.writer
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> VersionInfo:
        """Parse and check a record read from ``where`` (PackError naming what is wrong)."""
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT:
                raise PackError(f"{where}: format {doc.get('format')!r}, expected {FORMAT!r}")
            segments = tuple(_segment(s) for s in doc["segments"])
            info = cls(
                version=_int(doc["version"]),
                created=str(doc["created"]),
                files=_int(doc["files"]),
                size=_int(doc["bytes"]),
                manifest=str(doc["manifest"]),
                manifest_size=_int(doc["manifest_size"]),
                manifest_sha256=_sha(doc["manifest_sha256"]),
                segments=segments,
                parent=None if doc.get("parent") is None else _int(doc["parent"]),
                source=str(doc.get("source", "")),
                writer=str(doc.get("writer", "")),
            )
        except PackError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PackError(f"{where}: not a packed dataset version record ({exc})") from None
        if info.manifest != manifest_key(info.version):
            raise PackError(f"{where}: names the manifest {info.manifest!r}")
        return info


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _sha(value: object) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ValueError(f"{value!r} is not a SHA-256")
    return value


def _segment(doc: dict[str, Any]) -> SegmentInfo:
    name = str(doc["name"])
    segment_key(name)
    return SegmentInfo(name, _int(doc["size"]), _sha(doc["sha256"]), _int(doc["files"]))


def newest(versions: Sequence[int]) -> int | None:
    """The newest of the versions found (None: the dataset has none yet)."""
    return max(versions) if versions else None


def member_path(dest: PurePosixPath, path: str) -> PurePosixPath:
    """Where a member appears below ``dest`` (the path checked first)."""
    return dest / check_member_path(path)

"""A packed dataset's manifest: one Parquet row per file, sorted by path.

Columns (docs/packed-datasets.md): ``path`` (relative, '/'-separated, UTF-8), ``size``,
``mode`` (permission bits), ``mtime_ns``, ``segment`` (the tar file holding the bytes, dictionary
encoded), ``offset`` (of the file's first byte in that segment), ``crc32`` (zlib's CRC-32 of the
bytes) and ``etag`` (the source object's identity when packed, for ``pack --update``). Row
groups hold ``DEFAULT_ROW_GROUP`` rows, and every row group carries min/max statistics of
``path``, so a reader selecting a subtree reads the footer and the few row groups whose path
range meets it, never the whole file.

pyarrow does the reading and writing; the file is plain Parquet that any reader opens.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcstage.core.packed import DEFAULT_ROW_GROUP, FORMAT, check_member_path, subtree_bounds
from hpcstage.errors import PackError

SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("mode", pa.int32(), nullable=False),
        pa.field("mtime_ns", pa.int64(), nullable=False),
        pa.field("segment", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("crc32", pa.uint32(), nullable=False),
        pa.field("etag", pa.string(), nullable=False),
    ],
    metadata={"hpcstage.format": FORMAT},
)
COLUMNS = tuple(SCHEMA.names)


@dataclass(frozen=True, slots=True)  # slots: a pack holds ~10^5 of them at a time
class Member:
    """One file of a packed dataset, as its manifest row describes it."""

    path: str
    size: int
    mode: int
    mtime_ns: int
    segment: str
    offset: int
    crc32: int
    etag: str = ""


def members_of(batch: pa.RecordBatch | pa.Table) -> list[Member]:
    """The rows of ``batch`` as Members, each path checked (a manifest is untrusted input)."""
    cols = [batch.column(name).to_pylist() for name in COLUMNS]
    out = [Member(*row) for row in zip(*cols, strict=True)]
    for member in out:
        check_member_path(member.path)
        if member.size < 0 or member.offset < 0:
            raise PackError(f"{member.path!r}: negative size or offset in the manifest")
    return out


class ManifestWriter:
    """Writes manifest rows to a local Parquet file, checking they arrive sorted and unique."""

    def __init__(
        self,
        path: Path,
        row_group: int = DEFAULT_ROW_GROUP,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """``metadata``: key-value pairs added to the file's footer (a pack's part manifest
        records its segment's size and SHA-256 there)."""
        self.path = path
        self.row_group = row_group
        self.rows = 0
        self.last = ""
        self._pending: list[Member] = []
        self._schema = SCHEMA.with_metadata({**SCHEMA.metadata, **(metadata or {})})
        self._writer = pq.ParquetWriter(
            str(path), self._schema, compression="zstd", write_statistics=["path"]
        )

    def add(self, member: Member) -> None:
        """Append one row (paths strictly increasing: PackError otherwise)."""
        if self.rows and member.path <= self.last:
            raise PackError(
                f"manifest rows out of order or duplicated: {member.path!r} after {self.last!r}"
            )
        self.last = member.path
        self.rows += 1
        self._pending.append(member)
        if len(self._pending) >= self.row_group:
            self._flush()

    def add_all(self, members: list[Member]) -> None:
        for member in members:
            self.add(member)

    def _flush(self) -> None:
        if not self._pending:
            return
        rows = self._pending
        self._pending = []
        columns = [[getattr(m, name) for m in rows] for name in COLUMNS]
        table = pa.Table.from_arrays(
            [pa.array(col, type=SCHEMA.field(i).type) for i, col in enumerate(columns)],
            schema=self._schema,
        )
        self._writer.write_table(table, row_group_size=self.row_group)

    def close(self) -> int:
        """Write what is pending and the footer; the number of rows."""
        self._flush()
        self._writer.close()
        return self.rows

    def abort(self) -> None:
        """Close without caring what was written (the caller removes the file)."""
        with contextlib.suppress(OSError, pa.ArrowException):
            self._writer.close()


class RangeFile(io.RawIOBase):
    """A read-only, seekable file whose bytes come from ``fetch(start, length)`` (a ranged GET):
    what pyarrow reads a manifest through, so that only the footer and the chosen row groups
    cross the network. Reads are rounded up to ``block`` bytes and the last block is kept, so
    pyarrow's many small reads of one region cost one request. ``fetched`` counts the bytes
    asked of the store."""

    def __init__(self, size: int, fetch: Callable[[int, int], bytes], block: int = 1 << 20) -> None:
        super().__init__()
        self.size = size
        self.fetched = 0
        self._fetch = fetch
        self._block = block
        self._pos = 0
        self._buf_start = 0
        self._buf = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self.size - self._pos)
        if want <= 0:
            return 0
        end = self._pos + want
        buf_end = self._buf_start + len(self._buf)
        if not (self._buf_start <= self._pos and end <= buf_end):
            length = min(max(want, self._block), self.size - self._pos)
            self._buf = self._fetch(self._pos, length)
            self._buf_start = self._pos
            self.fetched += length
            if len(self._buf) != length:
                raise PackError(f"short read: {len(self._buf)} of {length} bytes")
        start = self._pos - self._buf_start
        view[:want] = self._buf[start : start + want]
        self._pos = end
        return want


class ManifestReader:
    """A manifest opened for selections (sync: run it in a thread when ``source`` does I/O)."""

    def __init__(self, source: str | Path | RangeFile, where: str) -> None:
        self.where = where
        try:
            self._file = pq.ParquetFile(source if isinstance(source, RangeFile) else str(source))
        except (pa.ArrowException, OSError) as exc:
            raise PackError(f"{where}: not a readable Parquet manifest ({exc})") from None
        names = self._file.schema_arrow.names
        if tuple(names) != COLUMNS:
            raise PackError(f"{where}: manifest columns {names}, expected {list(COLUMNS)}")

    @property
    def rows(self) -> int:
        return int(self._file.metadata.num_rows)

    def row_groups_for(self, subtree: str) -> list[int]:
        """The row groups whose path statistics meet ``subtree`` (all of them for "")."""
        low, high = subtree_bounds(subtree)
        meta = self._file.metadata
        chosen = []
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(0).statistics
            if stats is None or not stats.has_min_max:
                chosen.append(i)
                continue
            if str(stats.max) < low or (high is not None and str(stats.min) >= high):
                continue
            chosen.append(i)
        return chosen

    def select(self, subtree: str) -> Iterator[list[Member]]:
        """The members under ``subtree``, row group by row group, in path order."""
        low, high = subtree_bounds(subtree)
        subtree = low
        for i in self.row_groups_for(subtree):
            try:
                table = self._file.read_row_group(i, columns=list(COLUMNS))
            except (pa.ArrowException, OSError) as exc:
                raise PackError(f"{self.where}: row group {i} unreadable ({exc})") from None
            if subtree:
                paths = table.column("path")
                mask = pc.and_(pc.greater_equal(paths, low), pc.less(paths, high))
                table = table.filter(mask)
            if table.num_rows:
                yield members_of(table)

    def lookup(self, path: str) -> Member | None:
        """The member at exactly ``path`` (None: no such file), reading the row groups whose
        path range holds it (one, unless a path sits on a boundary)."""
        meta = self._file.metadata
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(0).statistics
            if (
                stats is not None
                and stats.has_min_max
                and not (str(stats.min) <= path <= str(stats.max))
            ):
                continue
            table = self._file.read_row_group(i, columns=list(COLUMNS))
            table = table.filter(pc.equal(table.column("path"), path))
            if table.num_rows:
                return members_of(table)[0]
        return None

    def entries(self, subtree: str) -> Iterator[tuple[str, Member | None]]:
        """What ``ls`` of the directory ``subtree`` shows, in order: (name, member) for a file,
        (name, None) for a directory. A row group wholly inside one subdirectory (its first
        and last path agree on the name) is counted from its statistics, never read, so the
        top of a 10^8-file dataset lists in a moment."""
        low, high = subtree_bounds(subtree)
        last = ""
        meta = self._file.metadata
        for i in self.row_groups_for(low):
            stats = meta.row_group(i).column(0).statistics
            if stats is not None and stats.has_min_max:
                first, final = str(stats.min), str(stats.max)
                a, b = _child(first, low), _child(final, low)
                if a == b and a is not None and a[1] and first >= low:
                    if a[0] != last:
                        last = a[0]
                        yield a[0], None
                    continue
            for batch in self._select_group(i, low, high):
                for member in batch:
                    child = _child(member.path, low)
                    if child is None or child[0] == last:
                        continue
                    last = child[0]
                    yield child[0], None if child[1] else member

    def _select_group(self, i: int, low: str, high: str | None) -> Iterator[list[Member]]:
        table = self._file.read_row_group(i, columns=list(COLUMNS))
        if low:
            paths = table.column("path")
            mask = pc.greater_equal(paths, low)
            if high is not None:
                mask = pc.and_(mask, pc.less(paths, high))
            table = table.filter(mask)
        if table.num_rows:
            yield members_of(table)

    def all(self) -> Iterator[list[Member]]:
        """Every member, in path order, a row group at a time."""
        return self.select("")


def _child(path: str, low: str) -> tuple[str, bool] | None:
    """The name directly under the directory ``low`` that ``path`` lies in, and whether that
    name is a directory (None: ``path`` is not under ``low``)."""
    if not path.startswith(low):
        return None
    name, slash, _ = path[len(low) :].partition("/")
    return name, bool(slash)

"""The packed format's pieces on real files: segments are tar archives other tools read, the
manifest is Parquet any reader opens, selections read only the row groups they need."""

from __future__ import annotations

import os
import subprocess
import tarfile
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hpcstage.core.packed import (
    DatasetRef,
    SegmentInfo,
    Span,
    VersionInfo,
    check_member_path,
    check_subtree,
    segment_name,
    sort_key,
    spans,
    subtree_bounds,
    tar_header,
)
from hpcstage.errors import PackError
from hpcstage.packed.manifest import ManifestReader, ManifestWriter, Member, RangeFile
from hpcstage.packed.segments import SegmentWriter, member_bytes

LONG = "d" * 120 + "/" + "e" * 90 + "/" + "f" * 200  # needs a pax header


def _segment(tmp_path: Path, files: dict[str, bytes]) -> tuple[Path, list[Member]]:
    writer = SegmentWriter(tmp_path / "seg.tar", segment_name(1, 0, 0))
    members = [writer.add(p, data, 0o640, 1_700_000_000_123_456_789) for p, data in files.items()]
    writer.finish()
    return tmp_path / "seg.tar", members


def test_a_segment_is_a_tar_archive_gnu_tar_and_tarfile_extract_byte_exact(
    tmp_path: Path,
) -> None:
    files = {"a.txt": b"alpha", "b/c.bin": os.urandom(1000), "empty": b"", LONG: b"long name"}
    seg, members = _segment(tmp_path, files)
    with tarfile.open(seg) as archive:
        got = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    assert got == files
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(seg), "-C", str(out)], check=True)
    for path, data in files.items():
        assert (out / path).read_bytes() == data
        assert (out / path).stat().st_mode & 0o777 == 0o640
    raw = seg.read_bytes()
    for member, data in zip(members, files.values(), strict=True):
        assert raw[member.offset : member.offset + member.size] == data
        assert member.crc32 == zlib.crc32(data)


def test_a_corrupt_member_is_refused_by_its_crc(tmp_path: Path) -> None:
    seg, members = _segment(tmp_path, {"x": b"hello world"})
    raw = bytearray(seg.read_bytes())
    span = Span(0, len(raw))
    assert bytes(member_bytes(span, raw, members[0])) == b"hello world"
    raw[members[0].offset] ^= 1
    with pytest.raises(PackError, match="CRC-32 mismatch"):
        member_bytes(span, raw, members[0])


def test_headers_fit_ustar_or_carry_pax_and_checksum_right() -> None:
    short = tar_header("a/b", 5, 0o644, 0)
    assert len(short) == 512
    long = tar_header(LONG, 5, 0o644, 0)
    assert len(long) == 512 * 3
    assert f"path={LONG}".encode() in long


def _manifest(tmp_path: Path, count: int, row_group: int) -> Path:
    path = tmp_path / "m.parquet"
    writer = ManifestWriter(path, row_group=row_group)
    for i in range(count):
        top = "ab"[i * 2 // count]
        name = f"{top}/{i // 1000:03d}/{i % 1000:03d}"
        writer.add(Member(name, 1, 0o644, 0, "s", i * 1024, 0, ""))
    assert writer.close() == count
    return path


def test_the_manifest_is_plain_parquet_sorted_and_selects_by_row_group(tmp_path: Path) -> None:
    path = _manifest(tmp_path, 10_000, row_group=1_000)
    table = pq.read_table(path)  # any Parquet reader: no hpcstage needed
    assert table.num_rows == 10_000
    assert table.column("path").to_pylist() == sorted(table.column("path").to_pylist())
    reader = ManifestReader(path, "m")
    assert reader.row_groups_for("") == list(range(10))
    assert reader.row_groups_for("b/") == list(range(5, 10))
    got = [m.path for batch in reader.select("b/") for m in batch]
    assert got == [f"b/{i // 1000:03d}/{i % 1000:03d}" for i in range(5_000, 10_000)]
    assert [m for batch in reader.select("c/") for m in batch] == []


def test_a_selection_through_ranges_reads_a_fraction_of_the_manifest(tmp_path: Path) -> None:
    path = _manifest(tmp_path, 200_000, row_group=10_000)
    data = path.read_bytes()
    source = RangeFile(len(data), lambda start, n: data[start : start + n], block=64 * 1024)
    reader = ManifestReader(source, "m")
    one_group = [m for batch in reader.select("b/199") for m in batch]
    assert [m.path for m in one_group] == [f"b/199/{i:03d}" for i in range(1000)]
    assert source.fetched < len(data) / 5, (source.fetched, len(data))


def test_rows_out_of_order_or_repeated_are_refused(tmp_path: Path) -> None:
    writer = ManifestWriter(tmp_path / "m.parquet")
    writer.add(Member("b", 1, 0o644, 0, "s", 0, 0))
    with pytest.raises(PackError, match="out of order"):
        writer.add(Member("a", 1, 0o644, 0, "s", 0, 0))
    with pytest.raises(PackError, match="out of order"):
        writer.add(Member("b", 1, 0o644, 0, "s", 0, 0))
    writer.abort()


@pytest.mark.parametrize(
    "bad", ["", "/etc/passwd", "a/../b", "a//b", "./a", "a/", "a\0b", "x" * 256]
)
def test_member_paths_that_could_escape_or_fail_are_refused(bad: str) -> None:
    with pytest.raises(PackError):
        check_member_path(bad)


def test_subtrees_bound_exactly_their_paths() -> None:
    low, high = subtree_bounds(check_subtree("a/b"))
    assert (low, high) == ("a/b/", "a/b0")
    inside = ["a/b/c", "a/b/\U0001f600"]
    outside = ["a/b", "a/b.txt", "a/bc/d", "a/b0", "a/c"]
    assert all(low <= p < high for p in inside)
    assert not any(low <= p < high for p in outside)


def test_a_walk_sorted_by_sort_key_yields_paths_in_string_order() -> None:
    tree = {"a": {"x": None}, "a.txt": None, "a-b": None, "b": {"c": {"d": None}}}

    def walk(node: dict[str, object], prefix: str) -> list[str]:
        out: list[str] = []
        for name in sorted(node, key=lambda n: sort_key(n, node[n] is not None)):
            child = node[name]
            if isinstance(child, dict):
                out += walk(child, f"{prefix}{name}/")
            else:
                out.append(prefix + name)
        return out

    paths = walk(tree, "")
    assert paths == sorted(paths)


def test_dataset_refs_parse_version_and_subtree() -> None:
    ref = DatasetRef.parse("lib/ligands.hpack@3/set1/x/")
    assert (ref.prefix, ref.version, ref.subtree) == ("lib/ligands.hpack/", 3, "set1/x/")
    assert DatasetRef.parse("ligands.hpack/") == DatasetRef("ligands.hpack/", None, "")
    assert ref.key() == "lib/ligands.hpack@3/set1/x/"
    for bad in ("lib/ligands/", "l.hpack@x/", "l.hpack/../etc/", "l.hpack@0/"):
        with pytest.raises(PackError):
            DatasetRef.parse(bad)


def test_spans_merge_close_members_and_split_far_ones() -> None:
    assert spans([(0, 10), (20, 10)], gap=100) == [Span(0, 30)]
    assert spans([(0, 10), (500, 10)], gap=100) == [Span(0, 10), Span(500, 510)]


def test_version_records_round_trip_and_refuse_tampering() -> None:
    seg = SegmentInfo(segment_name(2, 0, 1), 2048, "a" * 64, 3)
    info = VersionInfo(
        2,
        "2026-12-03T00:00:00Z",
        3,
        12,
        "manifests/00000002.parquet",
        10,
        "b" * 64,
        (seg,),
        parent=1,
    )
    assert VersionInfo.from_json(info.to_json(), "x") == info
    with pytest.raises(PackError, match="names the manifest"):
        VersionInfo.from_json(info.to_json().replace("00000002.parquet", "00000001.parquet"), "x")
    with pytest.raises(PackError, match="not a packed dataset version record"):
        VersionInfo.from_json(info.to_json().replace('"size": 2048', '"size": -1'), "x")
    with pytest.raises(PackError, match="not a segment name"):
        VersionInfo.from_json(info.to_json().replace(seg.name, "../../x.tar"), "x")

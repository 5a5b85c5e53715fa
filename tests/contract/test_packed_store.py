"""A packed dataset written and read on each store (rclone, moto, a shared filesystem):
versions appear only once whole, a pinned version stays readable, members come back byte-exact
through ranged reads, and a tampered segment is caught."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcstage.core.packed import DatasetRef, segment_key, segment_name
from hpcstage.errors import PackError
from hpcstage.packed.dataset import PackedDataset
from hpcstage.packed.manifest import Member
from hpcstage.packed.segments import SegmentWriter
from hpcstage.packed.writer import VersionWriter
from tests.contract.conftest import Harness

pytestmark = pytest.mark.anyio


async def _write(
    h: Harness, prefix: str, tmp_path: Path, version: int, files: dict[str, bytes], parent=None
) -> list[Member]:
    seg = SegmentWriter(tmp_path / f"seg{version}", segment_name(version, 0, 0))
    members = [seg.add(p, data, 0o644, 10**18) for p, data in sorted(files.items())]
    writer = VersionWriter(h.store, prefix, version, tmp_path, parent=parent)
    await writer.upload_segment(seg.finish())
    await writer.commit([members])
    return members


async def test_a_version_round_trips_and_selects_a_subtree(h: Harness, tmp_path: Path) -> None:
    prefix = h.key("lib.hpack/")
    files = {f"set{i % 3}/{i:04d}.sdf": os.urandom(50 + i) for i in range(300)}
    await _write(h, prefix, tmp_path, 1, files)
    dataset = PackedDataset(h.store, prefix)
    assert await dataset.versions() == [1]
    info = await dataset.record()
    assert (info.version, info.files, info.size) == (1, 300, sum(map(len, files.values())))
    chosen = [m async for batch in dataset.select(info, "set1/") for m in batch]
    assert [m.path for m in chosen] == sorted(p for p in files if p.startswith("set1/"))
    seg = await dataset.segment_ref(info, chosen[0].segment)
    assert await dataset.read_members(seg, chosen) == [files[m.path] for m in chosen]


async def test_a_new_version_leaves_the_old_one_readable(h: Harness, tmp_path: Path) -> None:
    prefix = h.key("lib.hpack/")
    await _write(h, prefix, tmp_path, 1, {"a": b"one"})
    dataset = PackedDataset(h.store, prefix)
    first = await dataset.record(1)
    await _write(h, prefix, tmp_path, 2, {"a": b"two", "b": b"new"}, parent=first)
    assert await dataset.versions() == [1, 2]
    for version, want in ((1, [b"one"]), (2, [b"two", b"new"])):
        info = await dataset.record(version)
        members = [m async for batch in dataset.select(info, "") for m in batch]
        seg = await dataset.segment_ref(info, members[0].segment)
        assert await dataset.read_members(seg, members) == want
    assert (await dataset.record()).version == 2
    with pytest.raises(PackError, match="no version 7"):
        await dataset.record(7)


async def test_the_same_version_cannot_be_written_twice(h: Harness, tmp_path: Path) -> None:
    prefix = h.key("lib.hpack/")
    await _write(h, prefix, tmp_path, 1, {"a": b"one"})
    with pytest.raises(PackError, match="another pack"):
        await _write(h, prefix, tmp_path, 1, {"a": b"other"})
    info = await PackedDataset(h.store, prefix).record(1)
    assert info.files == 1


async def test_a_tampered_segment_is_refused(h: Harness, tmp_path: Path) -> None:
    prefix = h.key("lib.hpack/")
    members = await _write(h, prefix, tmp_path, 1, {"a": b"A" * 100, "b": b"B" * 100})
    evil = tmp_path / "evil"
    seg = SegmentWriter(evil, segment_name(1, 0, 0))
    seg.add("a", b"A" * 100, 0o644, 10**18)
    seg.add("b", b"X" * 100, 0o644, 10**18)  # same size, other bytes
    seg.finish()
    await h.store.upload(evil, prefix + segment_key(segment_name(1, 0, 0)))
    dataset = PackedDataset(h.store, prefix)
    info = await dataset.record()
    ref = await dataset.segment_ref(info, members[0].segment)
    with pytest.raises(PackError, match="CRC-32 mismatch"):
        await dataset.read_members(ref, members)


async def test_a_directive_key_names_the_dataset(h: Harness) -> None:
    ref = DatasetRef.parse("x/lib.hpack@2/set1/")
    assert PackedDataset.at(h.store, ref).prefix == "x/lib.hpack/"

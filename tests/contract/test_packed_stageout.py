"""A packed stage-out (agent/packout.py) on real S3 servers (rclone: conditions ignored; moto:
If-None-Match honoured) from a real job directory: few PUTs, byte-exact, exactly once, and a
version number a dead attempt left segments under is skipped, never written over."""

from __future__ import annotations

import os
import uuid
from pathlib import Path, PurePosixPath

import pytest

from hpcstage.agent.jobdir import JobDir, Owners
from hpcstage.agent.packout import PackTarget, pack_out
from hpcstage.core.packed import segment_key, segment_name
from hpcstage.core.stageout import Output
from hpcstage.packed.dataset import PackedDataset
from hpcstage.protocol.messages import FileOutcome
from hpcstage.store.recycle import UploadJournal
from hpcstage.store.s3 import S3Store

pytestmark = pytest.mark.anyio


def _outputs(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / "out" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _target(store: S3Store, prefix: str, tmp: Path, writer: str) -> PackTarget:
    return PackTarget(
        store,
        prefix,
        writer,
        ended_at=0.0,
        work=tmp / "uploads" / "job" / f"pack-{uuid.uuid4().hex[:6]}",
        journal=UploadJournal(tmp / "uploads" / "job", store.bucket),
        segment_size=256 * 1024,
    )


async def _stage_out(target: PackTarget, root: Path) -> tuple[int, list[FileOutcome], list[Output]]:
    outcomes: list[FileOutcome] = []
    with JobDir(root, Owners.of("")) as jobdir:
        listed = list(jobdir.walk(PurePosixPath("out"), target.prefix))
        outputs = [o for o in listed if isinstance(o, Output)]
        info = await pack_out(target, jobdir, outputs, outcomes.append)
    return info.version, outcomes, outputs


async def _keys(store: S3Store, prefix: str) -> list[str]:
    return [ref.key async for ref in store.list(prefix)]


async def _read_all(dataset: PackedDataset, version: int) -> dict[str, bytes]:
    info = await dataset.record(version)
    members = [m async for batch in dataset.select(info, "") for m in batch]
    found: dict[str, bytes] = {}
    for name in sorted({m.segment for m in members}):
        ref = await dataset.segment_ref(info, name)
        mine = [m for m in members if m.segment == name]
        found.update(
            zip([m.path for m in mine], await dataset.read_members(ref, mine), strict=True)
        )
    return found


async def test_outputs_become_one_version_in_few_puts_and_a_retry_makes_no_second(
    any_s3: S3Store, tmp_path: Path
) -> None:
    files = {f"d{i % 7}/sub{i % 3}/f{i:04d}.txt": os.urandom(i % 900) for i in range(600)}
    files["big.bin"] = os.urandom(6 * 2**20 + 5)  # a multipart segment of its own
    files["a.txt"], files["a/x"] = b"before the directory a/", b"after a.txt"  # path order
    _outputs(tmp_path, files)
    prefix = f"po-{uuid.uuid4().hex[:8]}/run.hpack/"
    target = _target(any_s3, prefix, tmp_path, "job 7@1700000000 out 0")
    version, outcomes, outputs = await _stage_out(target, tmp_path)
    assert version == 1
    assert {o.state for o in outcomes} == {"uploaded"} and len(outcomes) == len(files)
    assert f"{prefix[:-1]}@1/big.bin" in {o.key for o in outcomes}
    dataset = PackedDataset(any_s3, prefix)
    assert await _read_all(dataset, 1) == files
    info = await dataset.record(1)
    assert (info.files, info.size, info.writer) == (
        len(files),
        sum(map(len, files.values())),
        "job 7@1700000000 out 0",
    )
    keys = await _keys(any_s3, prefix)
    # One object per segment, the manifest and the record: far fewer than files.
    assert len(keys) == len(info.segments) + 2 and 2 < len(info.segments) < 10, keys
    assert not target.work.exists()  # the spool is gone

    # The same stage-out again (its agent died before the daemon heard): no second version.
    again = _target(any_s3, prefix, tmp_path, "job 7@1700000000 out 0")
    version, outcomes, _ = await _stage_out(again, tmp_path)
    assert version == 1 and await dataset.versions() == [1]
    assert {o.state for o in outcomes} == {"present"} and len(outcomes) == len(outputs)
    assert await _keys(any_s3, prefix) == keys


async def test_a_dead_attempts_number_is_skipped_and_older_versions_stay_readable(
    any_s3: S3Store, tmp_path: Path
) -> None:
    prefix = f"po-{uuid.uuid4().hex[:8]}/res.hpack/"
    # What an attempt killed after its first segment leaves: a segment of version 1, no record.
    left = prefix + segment_key(segment_name(1, 0, 0))
    planted = tmp_path / "planted"
    planted.write_bytes(b"a dead attempt's segment")
    await any_s3.upload(planted, left)
    _outputs(tmp_path, {"r1.txt": b"one"})
    version, _, _ = await _stage_out(_target(any_s3, prefix, tmp_path, "job 1@5 out 0"), tmp_path)
    assert version == 2  # 1 is skipped: its segment is not written over
    dataset = PackedDataset(any_s3, prefix)
    assert (await dataset.record(2)).parent is None
    (tmp_path / "out" / "r1.txt").write_bytes(b"two")
    version, _, _ = await _stage_out(_target(any_s3, prefix, tmp_path, "job 2@9 out 0"), tmp_path)
    assert version == 3
    assert (await dataset.record(3)).parent == 2
    assert await _read_all(dataset, 2) == {"r1.txt": b"one"}
    assert await _read_all(dataset, 3) == {"r1.txt": b"two"}
    assert await dataset.versions() == [2, 3]

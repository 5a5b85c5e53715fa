"""``hpcstage pack``'s pure rules: cuts that depend only on the listing, plans that round-trip,
the --update rule, and the sbatch scripts of a Slurm pack."""

from __future__ import annotations

import pytest

from hpcstage.core.packed import BLOCK, segment_name
from hpcstage.core.packing import (
    PackPlan,
    SegmentCutter,
    SlurmPack,
    member_bytes,
    parse_size,
    part_key,
    pending_version,
    sbatch_args,
    segment_names,
    segment_of_part,
    slice_ranges,
    task_slices,
    unchanged,
)
from hpcstage.errors import PackError


def test_slices_cover_the_listing_once() -> None:
    assert slice_ranges(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert slice_ranges(0, 4) == []
    with pytest.raises(PackError):
        slice_ranges(10, 0)


@pytest.mark.parametrize("tasks", [1, 2, 3, 4, 7])
def test_the_tasks_of_an_array_pack_every_slice_once(tasks: int) -> None:
    got = sorted(s for t in range(tasks) for s in task_slices(10, t, tasks))
    assert got == list(range(10))
    with pytest.raises(PackError):
        task_slices(10, tasks, tasks)


def test_a_segment_ends_before_the_file_that_would_overflow_it() -> None:
    cutter = SegmentCutter(segment_size=4 * BLOCK, max_files=100)
    # Each 512-byte file costs a header block and a data block.
    assert [cutter.place(f"f{i}", 512) for i in range(5)] == [
        (0, True), (0, False), (1, True), (1, False), (2, True),
    ]  # fmt: skip


def test_a_file_bigger_than_a_segment_gets_one_of_its_own() -> None:
    cutter = SegmentCutter(segment_size=4 * BLOCK)
    assert cutter.place("small", 10) == (0, True)
    assert cutter.place("huge", 100 * BLOCK) == (1, True)
    assert cutter.place("next", 10) == (2, True)


def test_a_segment_holds_at_most_max_files() -> None:
    names = list(segment_names(3, 2, ((f"f{i}", 0) for i in range(7)), 2**30, 3))
    assert names == [segment_name(3, 2, s) for s in range(3)]


def test_a_long_path_costs_its_pax_header() -> None:
    assert member_bytes("a", 1) == 2 * BLOCK
    assert member_bytes("/".join(["d" * 200] * 2), 1) > 2 * BLOCK


def test_update_keeps_only_files_whose_identity_is_known_and_equal() -> None:
    assert unchanged(5, "e1", 5, "e1")
    assert not unchanged(5, "e1", 6, "e1")
    assert not unchanged(5, "e2", 5, "e1")
    assert not unchanged(5, "", 5, "")


def test_work_keys_name_their_version_and_segment() -> None:
    key = part_key(7, segment_name(7, 1, 2))
    assert key == "_pack/00000007/parts/00000007-00001-000002.parquet"
    assert segment_of_part(key) == segment_name(7, 1, 2)
    assert pending_version(key) == 7
    assert pending_version("versions/00000001.json") is None


def test_a_plan_round_trips_and_a_bad_one_is_refused() -> None:
    plan = PackPlan(3, 2, "/data", 10, 4, 400, 1, 2, 3, 2**20, 100, "2026-12-03T00:00:00Z")
    assert PackPlan.from_json(plan.to_json(), "x") == plan
    assert plan.slices == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    with pytest.raises(PackError, match="not a pack plan"):
        PackPlan.from_json('{"plan": 1, "version": 3}', "x")


@pytest.mark.parametrize(
    ("text", "size"), [("65536", 65536), ("64K", 65536), ("256M", 256 * 2**20), ("1GiB", 2**30)]
)
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_bad_size_is_refused() -> None:
    with pytest.raises(PackError, match="not a size"):
        parse_size("lots")


def test_the_slurm_scripts_run_the_steps() -> None:
    job = SlurmPack(("/opt/py", "-m", "hpcstage"), "s3://b/x y.hpack/", 4, ("--jobs", "2"))
    assert job.task_script() == (
        "#!/bin/bash\n# written by hpcstage pack --slurm\nset -eu\n"
        "exec /opt/py -m hpcstage pack-step slices 's3://b/x y.hpack/' --tasks 4 --jobs 2"
        ' --task "$SLURM_ARRAY_TASK_ID"\n'
    )
    assert job.merge_script().endswith(
        "exec /opt/py -m hpcstage pack-step merge 's3://b/x y.hpack/' --jobs 2\n"
    )
    args = sbatch_args(4, 2, "transfer", "hpack-1", "/logs", ["--time=60"])
    assert args == [
        "--array=0-3%2", "--job-name=hpack-1", "--output=/logs/hpack-1-%A_%a.out",
        "--partition=transfer", "--time=60",
    ]  # fmt: skip

"""The writer a packed stage-out records in its version: named from the job, carried in the
record only when set, and records without it (``hpcstage pack``'s, older ones) still read."""

from __future__ import annotations

import dataclasses
import json

from hpcstage.core.packed import SegmentInfo, VersionInfo, segment_name
from hpcstage.core.rules import packed_writer

INFO = VersionInfo(
    1,
    "2026-12-03T00:00:00Z",
    3,
    12,
    "manifests/00000001.parquet",
    10,
    "b" * 64,
    (SegmentInfo(segment_name(1, 0, 0), 2048, "a" * 64, 3),),
)


def test_a_record_names_its_writer_only_when_it_has_one() -> None:
    assert "writer" not in json.loads(INFO.to_json())
    assert VersionInfo.from_json(INFO.to_json(), "x").writer == ""
    mine = dataclasses.replace(INFO, writer=packed_writer("123", 1700000000.7, 2))
    assert json.loads(mine.to_json())["writer"] == "job 123@1700000000 out 2"
    assert VersionInfo.from_json(mine.to_json(), "x") == mine


def test_the_writer_tells_jobs_directives_and_requeued_runs_apart() -> None:
    names = {
        packed_writer("123", 1700000000.0, 0),
        packed_writer("123", 1700000000.0, 1),  # another directive of the job
        packed_writer("123", 1700000500.0, 0),  # the job requeued: a new submit time
        packed_writer("124", 1700000000.0, 0),
    }
    assert len(names) == 4

"""What a user may ask the daemon to pack (core.packing.PackRequest), and how the daemon reads
its child's lines (parse_pack_line). Pure."""

from __future__ import annotations

import json

import pytest

from hpcstage.config.schema import LimitSettings
from hpcstage.core.limits import pack_refusal
from hpcstage.core.packing import PackRequest, parse_pack_line
from hpcstage.errors import DirectiveError

SRC, DEST = "s3://datasets/chem/lig/", "s3://results/chem/lig.hpack/"


def test_a_prefix_into_a_whole_dataset_is_accepted() -> None:
    PackRequest(SRC, DEST, update=True, segment_size="64K").check()


@pytest.mark.parametrize(
    ("src", "dest", "size", "said"),
    [
        ("s3://datasets/chem/lig", DEST, "256M", "expected an S3 prefix"),
        ("/scratch/alice/lig/", DEST, "256M", "expected an S3 prefix"),
        ("s3://datasets/chem/../bio/", DEST, "256M", "'..'"),
        ("s3://datasets/chem//x/", DEST, "256M", "empty"),
        (SRC, "s3://results/chem/lig/", "256M", ".hpack"),
        (SRC, "s3://results/chem/lig.hpack@2/", "256M", ".hpack"),
        (SRC, "s3://results/chem/lig.hpack/set1/", "256M", "not a directory in it"),
        (SRC, "s3://datasets/chem/lig/x.hpack/", "256M", "must not hold"),
        ("s3://results/chem/lig.hpack/a/", DEST, "256M", "expected an S3 prefix"),
        (SRC, DEST, "1K", "at least"),
        (SRC, DEST, "64G", "at most 4 GiB"),
        (SRC, DEST, "lots", "not a size"),
        ("s3://datasets/chem/\x00/", DEST, "256M", "control character"),
    ],
)
def test_a_request_that_is_not_a_prefix_into_a_dataset_is_refused(
    src: str, dest: str, size: str, said: str
) -> None:
    with pytest.raises(DirectiveError, match=None) as caught:
        PackRequest(src, dest, segment_size=size).check()
    assert said in str(caught.value)


def test_the_childs_progress_and_summary_lines_are_decoded_and_other_lines_skipped() -> None:
    progress = {"event": "progress", "files": 3, "bytes": 10, "phase": "packing", "evil": 1}
    update = parse_pack_line(json.dumps(progress).encode())
    assert update is not None and update.event == "progress"
    assert update.progress == {"files": 3, "bytes": 10, "phase": "packing"}
    done = parse_pack_line(json.dumps({"event": "done", "version": 2, "files": 3}))
    assert done is not None and done.summary == {"version": 2, "files": 3}
    assert parse_pack_line(b"warning: something\n") is None
    assert parse_pack_line(b"[1, 2]") is None
    assert parse_pack_line(b'{"no": "event"}') is None


def test_a_user_with_as_many_packs_as_the_limit_is_refused() -> None:
    limits = LimitSettings(packs_in_flight=2)
    assert pack_refusal(limits, 1) == ""
    assert "limits.packs_in_flight is 2" in pack_refusal(limits, 2)
    assert pack_refusal(LimitSettings(packs_in_flight=0), 99) == ""


def test_a_user_without_a_running_pack_goes_first() -> None:
    from hpcstage.core.packing import packs_to_start

    queued = [(3, "alice"), (4, "alice"), (5, "bob"), (6, "carol")]
    # alice runs one already: bob's and carol's start before her next one.
    assert packs_to_start(queued, ["alice"], 2) == [5, 6]
    # Nobody runs: the oldest of each user first, then the rest in order.
    assert packs_to_start(queued, [], 3) == [3, 5, 6]
    assert packs_to_start(queued, [], 4) == [3, 5, 6, 4]
    assert packs_to_start(queued, [], 0) == []

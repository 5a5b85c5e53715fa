"""Which stage-out directives run for a job's end (stageout.should_run), the keys files get
(key_for), the recycle-bin keys of replaced versions (trash_key), when a stored object is
already the file (same_object) and which names can be keys (name_problem, shown): pure rules."""

from __future__ import annotations

import os
from typing import Any

import pytest

from hpcstage.core.stageout import (
    key_for,
    name_problem,
    same_object,
    should_run,
    shown,
    trash_key,
    version_tag,
)
from hpcstage.staging.trash import parse_trash_key

EVERY = frozenset({"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY"})


@pytest.mark.parametrize(
    ("when", "state", "runs"),
    [
        ("always", "COMPLETED", True),
        ("always", "FAILED", True),
        ("success", "COMPLETED", True),
        ("success", "TIMEOUT", False),
        ("failure", "FAILED", True),
        ("failure", "COMPLETED", False),
    ],
)
def test_conditional_directives_follow_the_end_state(when: str, state: str, runs: bool) -> None:
    assert should_run(when, state, EVERY)[0] is runs


def test_a_state_the_site_does_not_stage_out_says_why() -> None:
    runs, why = should_run("always", "CANCELLED", frozenset({"COMPLETED"}))
    assert (runs, why) == (False, "site does not stage out jobs that end CANCELLED")


@pytest.mark.parametrize("when", ["always", "success", "failure"])
def test_a_job_whose_end_was_not_seen_loses_no_output(when: str) -> None:
    # The daemon was down past MinJobAge: skipping would delete the outputs with the job
    # directory; uploading replaces nothing irrecoverably (the recycle bin keeps it).
    assert should_run(when, "GONE", frozenset({"COMPLETED"})) == (True, "")


def test_keys_under_a_prefix_or_at_a_key() -> None:
    assert key_for("out/", True, "a/b.txt", "results") == "out/a/b.txt"
    assert key_for("out/", False, "", "log.txt") == "out/log.txt"
    assert key_for("out/final.csv", False, "", "x.csv") == "out/final.csv"
    assert key_for("", True, "a.txt", "results") == "a.txt"


def test_a_trash_key_names_the_version_it_holds() -> None:
    # Two versions replaced at one key by one job (a retry after someone else wrote it) get
    # two names: a copy found at a name is a copy of that version.
    ended = 1_780_000_000.0
    first = trash_key(".bin/", ended, "42", "out/t.csv", "0123abcd" * 4)
    second = trash_key(".bin/", ended, "42", "out/t.csv", "feedbeef" * 4 + "-3")
    assert first == f".bin/2026-05-28/42~{'0123abcd' * 4}/out/t.csv"
    assert second == f".bin/2026-05-28/42~{'feedbeef' * 4}-3/out/t.csv"
    assert parse_trash_key(".bin/", first) == ("2026-05-28", "42", "out/t.csv")
    assert parse_trash_key(".bin/", ".bin/2026-05-28/42/out/t.csv")[1:] == ("42", "out/t.csv")


def test_a_hostile_etag_cannot_add_a_path_segment() -> None:
    assert version_tag('"a/../b"') == "ab"
    assert version_tag("") == "none"
    assert trash_key("t/", 0.0, "7", "k", "x/y").split("/") == ["t", "1970-01-01", "7~xy", "k"]


MD5 = "9e107d9d372bb6826bd81d3542a419d6"
SHA = "d7a8fbb307d7809469ca9abcb0082e4f8d5651e46d3cdb762d02d0bf37c9e592"


@pytest.mark.parametrize(
    ("etag", "size", "options", "same"),
    [
        (MD5, 43, {}, True),  # a single PUT: its ETag is the MD5
        (MD5, 44, {}, False),  # another size
        ("0" * 32, 43, {"stored_sha256": SHA}, False),  # an MD5 ETag that differs decides
        (f"{'1' * 32}-2", 43, {}, False),  # multipart, nothing recorded: treated as different
        (f"{'1' * 32}-2", 43, {"stored_sha256": SHA}, True),  # ...our own upload's SHA-256
        (f"{'1' * 32}-2", 43, {"stored_sha256": "0" * 64}, False),
        # SSE-KMS/SSE-C: an MD5-looking ETag that is none; only the recorded SHA-256 counts.
        (MD5, 43, {"etag_is_md5": False}, False),
        ("5" * 32, 43, {"etag_is_md5": False, "stored_sha256": SHA}, True),
    ],
)
def test_same_object_trusts_an_md5_etag_else_the_recorded_sha256(
    etag: str, size: int, options: dict[str, Any], same: bool
) -> None:
    assert same_object(etag, size, MD5, 43, sha256_hex=SHA, **options) is same


def test_a_file_name_that_is_not_utf8_is_refused_and_shown_escaped() -> None:
    name = os.fsdecode(b"bad\xff.txt")  # as os.scandir gives it: the byte as a surrogate
    assert "not UTF-8" in name_problem(name)
    assert name_problem("résumé ✓.txt") == ""
    assert shown(name) == "bad\\xff.txt"
    assert shown("résumé ✓.txt") == "résumé ✓.txt"
    assert shown("odd \ud800 surrogate") == "odd \\ud800 surrogate"  # none os gives: as is
    for text in (name, "odd \ud800 surrogate"):
        shown(text).encode("utf-8")  # storable

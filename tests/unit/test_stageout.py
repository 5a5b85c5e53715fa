"""Which stage-out directives run for a job's end (stageout.should_run), the keys files get
(key_for), which names can be keys (name_problem, shown): pure rules."""

from __future__ import annotations

import os

import pytest

from hpcstage.stageout import key_for, name_problem, should_run, shown

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


def test_a_file_name_that_is_not_utf8_is_refused_and_shown_escaped() -> None:
    name = os.fsdecode(b"bad\xff.txt")  # as os.scandir gives it: the byte as a surrogate
    assert "not UTF-8" in name_problem(name)
    assert name_problem("résumé ✓.txt") == ""
    assert shown(name) == "bad\\xff.txt"
    assert shown("résumé ✓.txt") == "résumé ✓.txt"
    assert shown("odd \ud800 surrogate") == "odd \\ud800 surrogate"  # none os gives: as is
    for text in (name, "odd \ud800 surrogate"):
        shown(text).encode("utf-8")  # storable

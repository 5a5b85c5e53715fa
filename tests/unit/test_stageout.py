"""Which stage-out directives run for a job's end (stageout.should_run), and the keys files
get (key_for): pure rules."""

from __future__ import annotations

import pytest

from hpcstage.stageout import key_for, should_run

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

"""Whose recycle-bin entry is it when its Slurm job id was given to more than one job?

Entries are filed as <day the job ended>/<job id>~<version>/<key>; since ids are given
again (issue 15 item 10), the job that held the id is found by the day as well. Before,
the owner was the newest job holding the id: after a reuse, the new job's user could list
and restore the old job's entries, and their owner could not.
"""

from __future__ import annotations

import calendar
import time

import pytest

from hpcstage.staging.trash import BinJob, owner_of


def ended(day: str) -> float:
    """Noon (UTC) of ``day``, when a job ended."""
    return float(calendar.timegm(time.strptime(f"{day} 12", "%Y-%m-%d %H")))


ALICE_MAY = BinJob("alice", "chem", ended("2026-05-01"))
BOB_DEC = BinJob("bob", "bio", ended("2026-12-01"))
ALICE_DEC = BinJob("alice", "chem", ended("2026-12-01"))
BOB_RUNNING = BinJob("bob", "bio", None)


@pytest.mark.parametrize(
    ("day", "jobs", "owner"),
    [
        ("2026-05-01", [ALICE_MAY], ALICE_MAY),  # the usual case: one job held the id
        ("2026-05-01", [ALICE_MAY, BOB_DEC], ALICE_MAY),  # the id was given to bob later
        ("2026-12-01", [ALICE_MAY, BOB_DEC], BOB_DEC),
        ("2026-12-01", [ALICE_MAY, BOB_RUNNING], None),  # no job ended that day, two users
        ("2026-07-09", [ALICE_MAY, ALICE_DEC], ALICE_DEC),  # no day matches: all alice's
        ("2026-12-01", [BOB_DEC, ALICE_DEC], None),  # two users' jobs ended that day
        ("2026-12-01", [], None),  # a job the daemon no longer knows: admins only
    ],
)
def test_the_owner_is_the_job_that_ended_that_day(
    day: str, jobs: list[BinJob], owner: BinJob | None
) -> None:
    assert owner_of(day, jobs) == owner

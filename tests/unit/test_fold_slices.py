"""A large queue is admitted in slices, the soonest jobs first (watch/fold.py, ``sync``'s
``admit_limit`` and ``admission_order``), on a real SQLite state database.

A daemon started beside 12,000 queued jobs must not hold its event loop for the whole
admission (the API and agent sessions wait meanwhile): each sync admits a bounded number,
and the jobs that need their data first go first."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.db import Job, open_db
from hpcstage.watch.fold import Directives, Folded, sync
from hpcstage.watch.slurm.model import JobInfo, QueueSnapshot
from tests.unit.test_fold_unchanged import info, with_directives

NOW = 1_790_100_000.0


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    made = open_db(f"sqlite:///{tmp_path / 'state.db'}")
    yield made
    made.kw["bind"].dispose()


def admit(db: sessionmaker[Session], folded: Folded, jobs: list[JobInfo], limit: int) -> set[int]:
    """One sync of ``jobs`` admitting at most ``limit``; the Slurm ids recorded so far."""
    read: list[int] = []

    async def directives(job: JobInfo) -> Directives:
        read.append(job.job_id)
        return await with_directives(job)

    with db.begin() as session:
        asyncio.run(
            sync(
                session,
                QueueSnapshot(NOW, "24.11.1", tuple(jobs)),
                directives,
                set(),
                folded,
                limit,
            )
        )
    folded.commit()
    assert len(read) <= limit  # no script beyond the slice was even read
    with db() as session:
        return set(session.scalars(select(Job.slurm_job_id)))


def test_a_queue_larger_than_a_slice_is_admitted_over_several_syncs(
    db: sessionmaker[Session],
) -> None:
    jobs = [info(i) for i in range(1, 251)]
    folded = Folded()
    assert len(admit(db, folded, jobs, 100)) == 100 and folded.deferred == 150
    assert len(admit(db, folded, jobs, 100)) == 200 and folded.deferred == 50
    assert admit(db, folded, jobs, 100) == set(range(1, 251)) and folded.deferred == 0
    assert admit(db, folded, jobs, 100) == set(range(1, 251))  # nothing admitted twice


def test_running_jobs_then_the_soonest_pending_then_the_highest_priority_go_first(
    db: sessionmaker[Session],
) -> None:
    running = [info(i, state="RUNNING", nodes=("n1",), start_time=NOW - 60) for i in (90, 91)]
    soon = [info(i, start_time=NOW + 60 * i) for i in (80, 81)]  # the scheduler's estimate
    urgent = info(70, priority=1000)
    rest = [info(i) for i in range(1, 21)]
    folded = Folded()
    first = admit(db, folded, [*rest, urgent, *soon, *running], 5)
    assert first == {90, 91, 80, 81, 70}
    assert folded.deferred == 20


def test_ended_and_directive_less_jobs_take_no_room_in_a_slice(
    db: sessionmaker[Session],
) -> None:
    ended = [info(i, state="COMPLETED") for i in range(1, 11)]
    live = [info(i) for i in range(11, 14)]
    folded = Folded()
    assert admit(db, folded, [*ended, *live], 3) == {11, 12, 13}
    assert folded.deferred == 0


def test_jobs_whose_rows_ended_take_no_room_so_new_jobs_are_still_admitted(
    db: sessionmaker[Session],
) -> None:
    # Three running jobs vanish from one snapshot (a squeue glitch: their rows end, GONE) and
    # come back. Admitting them again reads nothing (their rows say they were handled), so
    # they must not fill every slice: jobs 10 and 11, new, are admitted all the same.
    running = [info(i, state="RUNNING", nodes=("n1",), start_time=NOW - 60) for i in (1, 2, 3)]
    folded = Folded()
    assert admit(db, folded, running, 3) == {1, 2, 3}
    admit(db, folded, [], 3)  # gone: the rows end
    with db() as session:
        assert all(j.ended_at is not None for j in session.scalars(select(Job)))
    new = [info(10), info(11)]
    for _ in range(3):
        recorded = admit(db, folded, [*running, *new], 3)
    assert {10, 11} <= recorded
    assert folded.deferred == 0

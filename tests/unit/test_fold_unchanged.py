"""The watcher skips jobs whose queue record is the one it folded last time (watch/fold.py,
``Folded``), on a real SQLite state database.

Whether a job was looked at again is told by a column the fold writes from the record
(``state_reason``), overwritten in the database between two ticks: a skipped job keeps the
overwritten value, a job folded again gets the record's value back."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.db import Job, open_db
from hpcstage.watch.fold import Directives, Folded, sync
from hpcstage.watch.slurm.model import JobInfo, QueueSnapshot

TAMPERED = "written between ticks"


def info(job_id: int, **kw: object) -> JobInfo:
    base = JobInfo(
        job_id=job_id,
        array_job_id=None,
        array_task_id=None,
        name="j",
        user="bob",
        uid=None,
        account="chem",
        partition="debug",
        state="PENDING",
        state_reason="Priority",
        priority=1,
        submit_time=1_790_000_000.0 + job_id,
        start_time=None,
        end_time=None,
        nodes=(),
        planned_nodes=(),
        batch_host="",
        admin_comment="",
        comment="",
        work_dir="/w",
        exit_code=None,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    made = open_db(f"sqlite:///{tmp_path / 'state.db'}")
    yield made
    made.kw["bind"].dispose()  # Python 3.13 warns of sqlite connections left open


async def with_directives(job: JobInfo) -> Directives:
    item: dict[str, object] = {"src": "s3://b/in/", "dest": "in", "line": 2, "text": "--stage-in"}
    return Directives("admin_comment", [item], [])


def tick(db: sessionmaker[Session], folded: Folded, *jobs: JobInfo, commit: bool = True) -> None:
    """One sync of ``jobs``; ``commit=False``: its transaction rolls back."""
    snapshot = QueueSnapshot(1_790_100_000.0, "24.11.1", jobs)
    session = db()
    with session.begin() as transaction:
        asyncio.run(sync(session, snapshot, with_directives, set(), folded))
        if not commit:
            transaction.rollback()
    session.close()
    if commit:
        folded.commit()


def tamper(db: sessionmaker[Session]) -> None:
    with db.begin() as session:
        session.execute(update(Job).values(state_reason=TAMPERED))


def reasons(db: sessionmaker[Session]) -> dict[int | None, str]:
    with db.begin() as session:
        return dict(session.execute(select(Job.slurm_job_id, Job.state_reason)).all())


def test_an_unchanged_job_is_skipped_and_a_changed_one_folded(
    db: sessionmaker[Session],
) -> None:
    folded = Folded()
    tick(db, folded, info(1), info(2))
    assert reasons(db) == {1: "Priority", 2: "Priority"}
    tamper(db)
    # Job 2's record changed (it started); job 1's is the one folded last time.
    started = info(2, state="RUNNING", state_reason="None", nodes=("n1",))
    tick(db, folded, info(1), started)
    assert reasons(db) == {1: TAMPERED, 2: "None"}
    with db.begin() as session:
        assert session.scalars(select(Job.nodes).where(Job.slurm_job_id == 2)).one() == "n1"


def test_without_the_memory_every_job_is_folded_again(db: sessionmaker[Session]) -> None:
    tick(db, Folded(), info(1))
    tamper(db)
    tick(db, Folded(), info(1))  # a restarted daemon: nothing is known to be folded
    assert reasons(db) == {1: "Priority"}


def test_a_rolled_back_sync_is_not_remembered(db: sessionmaker[Session]) -> None:
    folded = Folded()
    tick(db, folded, info(1))
    changed = info(1, state_reason="Resources")
    tick(db, folded, changed, commit=False)
    assert reasons(db) == {1: "Priority"}
    tick(db, folded, changed)
    assert reasons(db) == {1: "Resources"}


def test_a_job_that_left_the_queue_ends_although_it_was_skipped(
    db: sessionmaker[Session],
) -> None:
    folded = Folded()
    tick(db, folded, info(1), info(2))
    tick(db, folded, info(1), info(2))
    tick(db, folded, info(1))
    with db.begin() as session:
        ended = dict(session.execute(select(Job.slurm_job_id, Job.state)).all())
    assert ended == {1: "PENDING", 2: "GONE"}


def test_a_job_ended_by_its_record_is_not_remembered(db: sessionmaker[Session]) -> None:
    folded = Folded()
    tick(db, folded, info(1))
    tick(db, folded, info(1, state="COMPLETED", end_time=1_790_050_000.0))
    assert 1 not in folded.rows
    with db.begin() as session:
        assert session.scalars(select(Job.ended_at)).one() == 1_790_050_000.0

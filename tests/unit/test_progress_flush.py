"""A tick writes only the progress counters that changed since the attempt's last write
(staging/records.py, ``StagingRecords.flush``), on a real SQLite state database.

Whether a staging was written again is told by its counter, overwritten in the database
between two flushes: a skipped staging keeps the overwritten value."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.core.rules import Progress
from hpcstage.db import Job, Request, Staging, open_db
from hpcstage.staging.records import StagingRecords

OVERWRITTEN = 999


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    made = open_db(f"sqlite:///{tmp_path / 'state.db'}")
    yield made
    made.kw["bind"].dispose()  # Python 3.13 warns of sqlite connections left open


def staging(db: sessionmaker[Session]) -> int:
    with db.begin() as session:
        job = Job(slurm_job_id=7, user="bob", state="RUNNING")
        request = Request(direction="in", src="s3://b/in/", dest="in")
        request.stagings.append(Staging(node="n1", state="running"))
        job.requests.append(request)
        session.add(job)
        session.flush()
        return request.stagings[0].id


def overwrite(db: sessionmaker[Session]) -> None:
    with db.begin() as session:
        session.execute(update(Staging).values(files_done=OVERWRITTEN))


def files_done(db: sessionmaker[Session], staging_id: int) -> int:
    with db.begin() as session:
        return session.get_one(Staging, staging_id).files_done


def test_unchanged_progress_is_not_written_again(db: sessionmaker[Session]) -> None:
    records = StagingRecords(db)
    sid = staging(db)
    records.progress[sid] = Progress(files_done=3)
    records.flush()
    assert files_done(db, sid) == 3
    overwrite(db)
    records.flush()  # nothing new reported
    assert files_done(db, sid) == OVERWRITTEN
    records.progress[sid].files_done = 4
    records.flush()
    assert files_done(db, sid) == 4


def test_a_new_attempt_is_written_even_with_the_same_counts(db: sessionmaker[Session]) -> None:
    records = StagingRecords(db)
    sid = staging(db)
    records.progress[sid] = Progress(files_done=3)
    records.flush()
    overwrite(db)
    records.progress[sid] = Progress(files_done=3)  # what a requeued attempt starts with
    records.flush()
    assert files_done(db, sid) == 3


def test_requeue_writes_every_running_staging(db: sessionmaker[Session]) -> None:
    records = StagingRecords(db)
    sid = staging(db)
    records.progress[sid] = Progress(files_done=3)
    records.flush()
    overwrite(db)
    records.flush(requeue=True)
    with db.begin() as session:
        st = session.get_one(Staging, sid)
        assert (st.files_done, st.state) == (3, "queued")

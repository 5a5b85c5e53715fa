"""A Slurm job id names one job at a time: a reused id (counter wrap, a reset state) is another
job, which must be staged as itself and never taken for the old one or refused as someone
else's. Pure decision first, then the watcher against a real SQLite state database."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.core.plan import JobView, MarkReleased, Release, plan
from hpcstage.db import Job, Request, open_db
from hpcstage.watch import tickview
from hpcstage.watch.fold import Directives, same_job, sync
from hpcstage.watch.slurm.model import JobInfo, QueueSnapshot
from hpcstage.watch.slurm.parse import parse_scontrol_show_job, parse_squeue_json

OLD_SUBMIT = 1_700_000_000.0
NEW_SUBMIT = 1_790_000_000.0


def info(
    job_id: int = 7, user: str = "bob", submit: float | None = NEW_SUBMIT, **kw: object
) -> JobInfo:
    base = JobInfo(
        job_id=job_id,
        array_job_id=None,
        array_task_id=None,
        name="new",
        user=user,
        uid=None,
        account="chem",
        partition="debug",
        state="PENDING",
        state_reason="",
        priority=1,
        submit_time=submit,
        start_time=None,
        end_time=None,
        nodes=(),
        planned_nodes=("n1",),
        batch_host="",
        admin_comment="",
        comment="",
        work_dir="/w",
        exit_code=None,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def row(
    user: str = "alice", submitted: float | None = OLD_SUBMIT, first_seen: float = OLD_SUBMIT + 5
) -> Job:
    return Job(kind="job", slurm_job_id=7, user=user, submitted_at=submitted, first_seen=first_seen)


# -- the pure decision ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "same"),
    [
        (row(user="bob"), info(submit=OLD_SUBMIT), True),  # the job itself, seen again
        (row(user="bob"), info(submit=NEW_SUBMIT), False),  # the id given to a newer job
        (row(user="alice"), info(submit=OLD_SUBMIT), False),  # a job never changes owner
        # Slurm gives a requeued job a new submit time, and counts the restart.
        (row(user="bob"), info(submit=NEW_SUBMIT, restarts=1), True),
        (row(user="bob"), info(submit=None), True),  # nothing to tell them apart by
        # Rows from before submit times were kept: a job submitted after the daemon first
        # saw the old one cannot be it (with slack for the two hosts' clocks).
        (row(user="bob", submitted=None), info(submit=OLD_SUBMIT), True),
        (row(user="bob", submitted=None), info(submit=OLD_SUBMIT + 60), True),
        (row(user="bob", submitted=None), info(submit=NEW_SUBMIT), False),
        (row(user="alice", submitted=None), info(submit=None), False),
    ],
)
def test_same_job(old: Job, new: JobInfo, same: bool) -> None:
    assert same_job(old, new) is same


def test_squeue_json_reports_restarts() -> None:
    golden = Path(__file__).resolve().parent.parent / "golden" / "slurm-24.11" / "squeue.json"
    text = golden.read_text()
    assert {job.restarts for job in parse_squeue_json(text, taken_at=0).jobs} == {0}
    requeued = text.replace('"restart_cnt": 0', '"restart_cnt": 2', 1)
    assert 2 in {job.restarts for job in parse_squeue_json(requeued, taken_at=0).jobs}


def test_scontrol_reports_restarts() -> None:
    golden = Path(__file__).resolve().parent.parent / "golden" / "slurm-22.05"
    text = (golden / "scontrol-show-job.txt").read_text()
    assert {job.restarts for job in parse_scontrol_show_job(text, tz=UTC)} == {0}
    requeued = text.replace("Restarts=0", "Restarts=3", 1)
    assert 3 in {job.restarts for job in parse_scontrol_show_job(requeued, tz=UTC)}


# -- the watcher on a real state database ---------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    made = open_db(f"sqlite:///{tmp_path / 'state.db'}")
    yield made
    made.kw["bind"].dispose()  # Python 3.13 warns of sqlite connections left open


async def with_directives(job: JobInfo) -> Directives:
    item: dict[str, object] = {"src": "s3://b/in/", "dest": "in", "line": 2, "text": "--stage-in"}
    return Directives("admin_comment", [item], [])


async def without_directives(job: JobInfo) -> Directives:
    return Directives("none", [], [])


def tick(
    db: sessionmaker[Session], *jobs: JobInfo, ignored: set[tuple[int, float | None]] | None = None
) -> None:
    snapshot = QueueSnapshot(NEW_SUBMIT + 100, "24.11.1", jobs)
    with db.begin() as session:
        asyncio.run(sync(session, snapshot, with_directives, set() if ignored is None else ignored))


def add_old(db: sessionmaker[Session], released: bool, ended: bool = True) -> int:
    with db.begin() as session:
        old = row()
        old.state, old.ended_at = ("COMPLETED", OLD_SUBMIT + 50) if ended else ("RUNNING", None)
        old.released_at = OLD_SUBMIT + 60 if released else None
        session.add(old)
        session.flush()
        return old.id


def rows_for(db: sessionmaker[Session], slurm_id: int) -> list[Job]:
    with db.begin() as session:
        return list(session.scalars(select(Job).where(Job.slurm_job_id == slurm_id)))


def test_a_reused_id_is_staged_as_the_new_job(db: sessionmaker[Session]) -> None:
    old_id = add_old(db, released=True)
    tick(db, info())
    with db.begin() as session:
        # What the API and `hpcstage env` look up by the id: the new job's row.
        new = session.scalars(select(Job).where(Job.slurm_job_id == 7)).one()
        assert (new.user, new.submitted_at, new.id != old_id) == ("bob", NEW_SUBMIT, True)
        assert [r.direction for r in new.requests] == ["in"]
        old = session.get_one(Job, old_id)
        assert (old.slurm_job_id, old.slurm_id, old.user) == (None, 7, "alice")


def test_the_job_itself_seen_again_after_its_end_is_not_admitted_twice(
    db: sessionmaker[Session],
) -> None:
    add_old(db, released=True)
    tick(db, info(user="alice", submit=OLD_SUBMIT))
    (only,) = rows_for(db, 7)
    assert only.user == "alice"


def test_a_reused_id_waits_until_the_old_jobs_directory_is_released(
    db: sessionmaker[Session],
) -> None:
    # Until then the nodes' jobs/7 is the old job's (its user still has access to it).
    old_id = add_old(db, released=False, ended=False)
    tick(db, info())
    (old,) = rows_for(db, 7)
    assert old.id == old_id
    assert old.ended_at is not None and old.replaced_at is not None  # it is gone from Slurm
    with db.begin() as session:
        session.get_one(Job, old_id).released_at = NEW_SUBMIT + 110
    tick(db, info())
    (new,) = rows_for(db, 7)
    assert new.user == "bob"


def test_a_job_id_without_directives_is_looked_at_again_when_reused(
    db: sessionmaker[Session],
) -> None:
    ignored: set[tuple[int, float | None]] = set()
    snapshot = QueueSnapshot(OLD_SUBMIT + 10, "24.11.1", (info(user="alice", submit=OLD_SUBMIT),))
    with db.begin() as session:
        asyncio.run(sync(session, snapshot, without_directives, ignored))
    tick(db, info(), ignored=ignored)
    (new,) = rows_for(db, 7)
    assert new.user == "bob"


def test_a_replaced_job_is_released_without_its_lease_grace() -> None:
    # Its id now names another job: nothing can requeue it, and the new job needs jobs/<id>.
    view = JobView(
        id=1,
        kind="job",
        state="COMPLETED",
        ended_at=1000.0,
        node_states={"n1": "ready"},
        replaced=True,
    )
    actions = plan([view], 1001.0, 900.0, {})
    assert [(type(a), a.node) for a in actions if isinstance(a, Release)] == [(Release, "n1")]
    assert not [a for a in actions if isinstance(a, MarkReleased)]


def test_array_ids_are_recorded_and_follow_the_pending_record_into_its_last_task(
    db: sessionmaker[Session],
) -> None:
    """`hpcstage status` shows 40_3 and 40_[4-19]: the rows hold what squeue said."""
    task = info(job_id=43, array_job_id=40, array_task_id=3, state="RUNNING")
    pending = info(job_id=40, array_job_id=40, array_tasks="4-19")
    tick(db, task, pending)
    shown = {j.slurm_job_id: (j.array_job_id, j.array_task_id, j.array_tasks) for j in _jobs(db)}
    assert shown == {43: (40, 3, ""), 40: (40, None, "4-19")}
    tick(db, task, dataclasses.replace(pending, array_task_id=19, array_tasks=""))
    (last,) = rows_for(db, 40)
    assert (last.array_job_id, last.array_task_id, last.array_tasks) == (40, 19, "")


def _jobs(db: sessionmaker[Session]) -> list[Job]:
    with db.begin() as session:
        return list(session.scalars(select(Job)))


ARRAY_SCRIPT = (
    "#!/bin/bash\n#HPCSTAGE --stage-in=s3://datasets/lig/\n"
    "#HPCSTAGE --stage-out=out:s3://results/run/%A_%a/\n"
    "#HPCSTAGE --stage-out=log.txt:s3://results/logs/%j.txt\necho\n"
)


async def array_directives(job: JobInfo) -> Directives:
    from hpcstage.core.directives import parse_script
    from hpcstage.watch.admission import to_directives

    return to_directives("script", parse_script(ARRAY_SCRIPT), job)


def test_an_array_record_admitted_before_its_task_id_writes_under_that_task_id(
    db: sessionmaker[Session],
) -> None:
    # Admission sees the array's pending record (no task id: %a is sbatch's 4294967294); the
    # record becomes task 19 when it starts, and its outputs must go under 40_19.
    pending = info(job_id=40, array_job_id=40, array_tasks="4-19")
    snapshot = QueueSnapshot(NEW_SUBMIT + 100, "24.11.1", (pending,))
    with db.begin() as session:
        asyncio.run(sync(session, snapshot, array_directives, set()))
    started = dataclasses.replace(pending, array_task_id=19, array_tasks="", state="RUNNING")
    snapshot = QueueSnapshot(NEW_SUBMIT + 105, "24.11.1", (started,))
    with db.begin() as session:
        asyncio.run(sync(session, snapshot, array_directives, set()))
        (job,) = session.scalars(select(Job).where(Job.slurm_job_id == 40))
        dests = [r.dest for r in job.requests if r.direction == "out"]
    assert dests == ["s3://results/run/40_19/", "s3://results/logs/40.txt"]


def test_a_job_requeued_after_its_end_is_staged_again_as_a_run_of_its_own(
    db: sessionmaker[Session],
) -> None:
    # `scontrol requeue` of a finished job: Slurm counts a restart and gives a new submit time.
    old_id = add_old(db, released=False)
    rerun = info(user="alice", submit=NEW_SUBMIT, restarts=1)
    tick(db, rerun)
    (old,) = rows_for(db, 7)
    assert old.id == old_id and old.replaced_at is not None  # its directories go first
    with db.begin() as session:
        session.get_one(Job, old_id).released_at = NEW_SUBMIT + 110
    tick(db, rerun)
    with db.begin() as session:
        new = session.scalars(select(Job).where(Job.slurm_job_id == 7)).one()
        assert (new.id != old_id, new.user, new.submitted_at) == (True, "alice", NEW_SUBMIT)
        assert [r.direction for r in new.requests] == ["in"]


def test_a_job_requeued_while_it_ran_ends_that_run_unwritten_and_is_staged_again(
    db: sessionmaker[Session],
) -> None:
    # `scontrol requeue` of a running job (or a node failure) before the daemon saw it end.
    old_id = add_old(db, released=False, ended=False)
    with db.begin() as session:
        out = Request(direction="out", position=0, src="out", dest="s3://r/7/", text="out")
        session.get_one(Job, old_id).requests = [out]
    rerun = info(user="alice", submit=NEW_SUBMIT, restarts=1, state="PENDING")
    tick(db, rerun)
    (old,) = rows_for(db, 7)
    assert (old.id, old.state, old.ended_at, old.replaced_at) == (
        old_id,
        "REQUEUED",
        NEW_SUBMIT + 100,
        NEW_SUBMIT + 100,
    )
    with db.begin() as session:
        (view,) = [v for v in tickview.read_views(session) if v.id == old_id]
    # Its partial outputs are not written back, its directories released without grace.
    assert (view.out_state, view.replaced, view.ended_at) == ("none", True, NEW_SUBMIT + 100)
    tick(db, rerun)
    assert [r.id for r in rows_for(db, 7)] == [old_id]  # the re-run waits for the release
    with db.begin() as session:
        session.get_one(Job, old_id).released_at = NEW_SUBMIT + 110
    tick(db, rerun)
    with db.begin() as session:
        new = session.scalars(select(Job).where(Job.slurm_job_id == 7)).one()
        assert (new.id != old_id, new.ended_at, new.submitted_at) == (True, None, NEW_SUBMIT)


def test_a_requeue_is_known_by_its_restart_count_before_the_new_submit_time(
    db: sessionmaker[Session],
) -> None:
    # Slurm counts the restart at once; the new submit time comes once the run is wound down.
    old_id = add_old(db, released=False, ended=False)
    with db.begin() as session:
        session.get_one(Job, old_id).restarts = 0
    winding = info(user="alice", submit=OLD_SUBMIT, restarts=1, state="COMPLETING")
    tick(db, winding)
    (old,) = rows_for(db, 7)
    assert (old.state, old.replaced_at) == ("REQUEUED", NEW_SUBMIT + 100)
    with db.begin() as session:
        session.get_one(Job, old_id).released_at = NEW_SUBMIT + 110
    tick(db, winding)
    assert [r.id for r in rows_for(db, 7)] == [old_id]  # the re-run is not in the queue yet
    tick(db, info(user="alice", submit=NEW_SUBMIT, restarts=1, state="PENDING"))
    with db.begin() as session:
        new = session.scalars(select(Job).where(Job.slurm_job_id == 7)).one()
        assert (new.id != old_id, new.restarts, new.submitted_at) == (True, 1, NEW_SUBMIT)


def test_a_job_requeued_within_a_second_of_its_submission_is_rerun(
    db: sessionmaker[Session],
) -> None:
    # Slurm makes the new submit time one second later when the requeue came in the same one.
    old_id = add_old(db, released=False, ended=False)
    with db.begin() as session:
        session.get_one(Job, old_id).restarts = 0
    tick(db, info(user="alice", submit=OLD_SUBMIT, restarts=1, state="COMPLETING"))
    with db.begin() as session:
        session.get_one(Job, old_id).released_at = NEW_SUBMIT + 110
    tick(db, info(user="alice", submit=OLD_SUBMIT + 1, restarts=1, state="PENDING"))
    with db.begin() as session:
        new = session.scalars(select(Job).where(Job.slurm_job_id == 7)).one()
        assert (new.id != old_id, new.submitted_at) == (True, OLD_SUBMIT + 1)


def test_a_running_job_seen_again_with_its_restart_count_is_not_requeued_again(
    db: sessionmaker[Session],
) -> None:
    # Admitted after an earlier requeue: the restart is counted, the submit time unchanged.
    add_old(db, released=False, ended=False)
    running = info(user="alice", submit=OLD_SUBMIT, restarts=1, state="RUNNING")
    tick(db, running)
    tick(db, running)  # now with the count it keeps
    (only,) = rows_for(db, 7)
    assert (only.state, only.ended_at, only.replaced_at) == ("RUNNING", None, None)
    assert only.restarts == 1


def test_a_finished_job_seen_again_with_its_restart_count_is_not_a_rerun(
    db: sessionmaker[Session],
) -> None:
    # A job requeued while it ran, then finished: squeue shows it COMPLETED with a restart.
    add_old(db, released=True)
    tick(db, info(user="alice", submit=OLD_SUBMIT, restarts=1, state="COMPLETED"))
    (only,) = rows_for(db, 7)
    assert only.replaced_at is None

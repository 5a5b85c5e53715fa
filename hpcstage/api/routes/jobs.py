"""/api/v1/jobs: Slurm jobs with staging directives, and a job asking for its inputs now."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.api.deps import Caller, Database, JobId, Service, owned
from hpcstage.api.follow import SINCE, WAIT, document, followed
from hpcstage.api.status import job_summary
from hpcstage.db import Job

UNKNOWN_JOB_WAIT = 2.5  # poll intervals to wait for a job the daemon has not seen yet
MAX_FILTER = 100  # users or states one listing may name: an IN list, not a query of any size

router = APIRouter(prefix="/api/v1/jobs")


@router.get("")
async def jobs(
    db: Database,
    me: Caller,
    all: bool = False,
    user: Annotated[list[str] | None, Query()] = None,
    state: Annotated[list[str] | None, Query()] = None,
) -> list[dict[str, Any]]:
    """Your jobs with directives (admins: everyone's); unfinished ones unless ?all=true.

    ``user`` and ``state`` (each repeatable) keep the jobs of these users, in these Slurm
    states (``squeue -o %T``'s words; a warmup's state is WARMUP, a
    kept-warm dataset's PINNED): ``hpcstage status -u -t``.
    """
    _check_filter("user", user or [], 64)
    _check_filter("state", state or [], 32)
    with db.begin() as session:
        query = select(Job).order_by(Job.id)
        if not all:
            query = query.where(Job.released_at.is_(None))
        if not me.admin:
            query = query.where(Job.user == me.user)
        if user:
            query = query.where(Job.user.in_(user))
        if state:
            query = query.where(Job.state.in_([s.upper() for s in state]))
        return [job_summary(j) for j in session.scalars(query)]


def _check_filter(name: str, values: list[str], longest: int) -> None:
    """422 for a filter no job could match: longer than the column, or an IN list of any size."""
    if len(values) > MAX_FILTER:
        raise HTTPException(422, f"at most {MAX_FILTER} values of {name}")
    if any(len(value) > longest for value in values):
        raise HTTPException(422, f"a {name} is at most {longest} characters")


@router.get("/{job_id}")
async def job(
    job_id: JobId,
    daemon: Service,
    db: Database,
    me: Caller,
    since: int | None = SINCE,
    wait: float = WAIT,
) -> dict[str, Any]:
    """One Slurm job: state, each input per node with progress, errors, events.

    With ``since`` (the ``changes`` of an earlier answer) and ``wait``, the answer waits
    until the daemon has committed a change to this job since, for at most ``wait``
    seconds (long polling: how ``hpcstage env`` and ``warmup`` follow a staging).
    """
    with db.begin() as session:
        found = session.scalar(select(Job).where(Job.slurm_job_id == job_id))
        key = owned(found, me, f"job {job_id}").id
    return await followed(daemon, db, key, since, wait)


# Slurm's restart count (uint16): SLURM_RESTART_COUNT in a re-run's environment.
Restarts = Annotated[
    int,
    Query(
        ge=0,
        le=2**16 - 1,
        description="times Slurm requeued the asking run (SLURM_RESTART_COUNT; 0 if unset)",
        examples=[0, 1],
    ),
]


@router.post("/{job_id}/ensure")
async def ensure(
    job_id: JobId, daemon: Service, db: Database, me: Caller, restarts: Restarts = 0
) -> dict[str, Any]:
    """A job asks for its inputs now (from ``hpcstage env``): look at the queue at once."""
    deadline = time.monotonic() + UNKNOWN_JOB_WAIT * daemon.settings.slurm.poll_interval
    while True:
        daemon.wake(fresh=True)
        late = time.monotonic() > deadline
        answer = None
        with db.begin() as session:
            found = _asking_job(session, job_id, late)
            unseen = _run_not_admitted(session, job_id, restarts)
            if found is not None and not unseen:
                answer = document(daemon, session, owned(found, me, f"job {job_id}"))
                key = found.id
        if answer is not None:
            daemon.job_asked(key)  # its wait for data starts (or is 0): for /metrics
            return answer
        if late and (unseen or _earlier_run_pending(db, job_id)):
            # Requeued: the re-run is admitted once the earlier run's directories are
            # released (outputs first, if it ended). `hpcstage env` asks again on 503.
            raise HTTPException(
                503,
                f"job {job_id}: its earlier run is still being wound up (outputs, directories);"
                " its inputs are staged after that",
                headers={"Retry-After": "5"},
            )
        if late:
            raise HTTPException(
                404,
                f"job {job_id} is not known to hpcstage: it has no staging directives"
                " the daemon can read (see `hpcstage status` and the daemon log)",
            )
        await asyncio.sleep(0.5)


def _earlier_run_pending(db: sessionmaker[Session], job_id: int) -> bool:
    """Whether an earlier run of Slurm job ``job_id`` (requeued, or an older job with its id)
    is over but not released yet: the asking job is admitted after that."""
    with db.begin() as session:
        query = select(Job.id).where(
            Job.slurm_job_id == job_id, Job.replaced_at.is_not(None), Job.released_at.is_(None)
        )
        return session.scalar(query.limit(1)) is not None


def _run_not_admitted(session: Session, job_id: int, restarts: int) -> bool:
    """Whether the daemon's row with Slurm id ``job_id`` records an earlier run than the one
    asking (``restarts``: Slurm's count of the asking run). Slurm may start a requeued job's
    re-run a second after the requeue: the row, and the directories, are still the earlier
    run's until the daemon has seen it, and wound it up (a row of an older release, which
    kept no count, counts as 0 until the daemon folds it)."""
    found = session.scalar(select(Job).where(Job.slurm_job_id == job_id))
    return found is not None and (found.restarts or 0) < restarts


def _asking_job(session: Session, job_id: int, late: bool) -> Job | None:
    """The row of the job with Slurm id ``job_id`` that is asking, if the daemon has it.

    A job that asks runs: an ended row with its id may be an older job Slurm gave the id
    before (see hpcstage.watch.fold), not yet replaced by the daemon; once ``late``, an
    ended row is answered all the same.
    """
    found = session.scalar(select(Job).where(Job.slurm_job_id == job_id))
    if found is None or found.replaced_at is not None:
        return None
    return found if found.ended_at is None or late else None

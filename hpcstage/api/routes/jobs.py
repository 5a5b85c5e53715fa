"""/api/v1/jobs: Slurm jobs with staging directives, and a job asking for its inputs now."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, HTTPException
from sqlalchemy import select
from sqlalchemy.orm import Session

from hpcstage.api.deps import Caller, Database, Service, owned
from hpcstage.api.follow import SINCE, WAIT, document, followed
from hpcstage.api.status import job_summary
from hpcstage.db import Job

UNKNOWN_JOB_WAIT = 2.5  # poll intervals to wait for a job the daemon has not seen yet

router = APIRouter(prefix="/api/v1/jobs")


@router.get("")
async def jobs(db: Database, me: Caller, all: bool = False) -> list[dict[str, Any]]:
    """Your jobs with directives (admins: everyone's); unfinished ones unless ?all=true."""
    with db.begin() as session:
        query = select(Job).order_by(Job.id)
        if not all:
            query = query.where(Job.released_at.is_(None))
        if not me.admin:
            query = query.where(Job.user == me.user)
        return [job_summary(j) for j in session.scalars(query)]


@router.get("/{job_id}")
async def job(
    job_id: int,
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


@router.post("/{job_id}/ensure")
async def ensure(job_id: int, daemon: Service, db: Database, me: Caller) -> dict[str, Any]:
    """A job asks for its inputs now (from ``hpcstage env``): look at the queue at once."""
    deadline = time.monotonic() + UNKNOWN_JOB_WAIT * daemon.settings.slurm.poll_interval
    while True:
        daemon.wake(fresh=True)
        late = time.monotonic() > deadline
        answer = None
        with db.begin() as session:
            found = _asking_job(session, job_id, late)
            if found is not None:
                answer = document(daemon, session, owned(found, me, f"job {job_id}"))
                key = found.id
        if answer is not None:
            daemon.job_asked(key)  # its wait for data starts (or is 0): for /metrics
            return answer
        if late:
            raise HTTPException(
                404,
                f"job {job_id} is not known to hpcstage: it has no staging directives"
                " the daemon can read (see `hpcstage status` and the daemon log)",
            )
        await asyncio.sleep(0.5)


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

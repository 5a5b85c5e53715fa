"""A job's (or warmup's) status document, and long polling for its next change."""

from __future__ import annotations

from typing import Any

from fastapi import Query
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.api.service import StagingService
from hpcstage.api.status import job_document
from hpcstage.db import Job

MAX_WAIT = 20.0  # seconds a long-polling request may wait (the CLI's HTTP timeout is 30)

SINCE = Query(
    None, description="`changes` of an earlier answer: wait until the job changes after it"
)
WAIT = Query(0.0, ge=0, le=MAX_WAIT, description="seconds to wait at most (with since)")


def document(daemon: StagingService, session: Session, job: Job) -> dict[str, Any]:
    """A job's status document with live progress and the daemon's change count."""
    doc = job_document(session, job, live=daemon.live_progress())
    doc["changes"] = daemon.changes.count
    return doc


async def followed(
    daemon: StagingService, db: sessionmaker[Session], key: int, since: int | None, wait: float
) -> dict[str, Any]:
    """Job ``key``'s document once it changed after ``since`` or ``wait`` s passed."""
    await daemon.changes.wait(key, since, wait)
    with db.begin() as session:
        return document(daemon, session, session.get_one(Job, key))

"""The dashboard's document (``GET /api/v1/dashboard``, and the page at /): what is staging now
with its progress per node, how long jobs waited for their inputs at start, recent errors and
the newest jobs, each limited to what the viewer may see (their own jobs; admins: all).

Node caches are added by the route (:mod:`hpcstage.api.node_usage`): they need the agents,
this module only the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, selectinload

from hpcstage.api.status import Live, job_summary, node_readiness, ready_times
from hpcstage.auth import Identity
from hpcstage.db import Event, Job, Request, Staging

JOBS_SHOWN = 200  # newest jobs in the table
STAGING_SHOWN = 50  # unreleased jobs in "staging now"
WAITS_SHOWN = 20  # newest started jobs in "waits at start"
ERRORS_SHOWN = 20  # newest error events


def overview(session: Session, me: Identity, live: Live, now: float) -> dict[str, Any]:
    """Everything the dashboard shows but the node caches, for ``me``. "Staging now" holds
    jobs (and warmups) not ended nor released: an ended job's inputs are only kept a while."""
    unreleased = _mine(select(Job).where(Job.released_at.is_(None), Job.ended_at.is_(None)), me)
    started = _mine(select(Job).where(Job.started_at.is_not(None), Job.kind == "job"), me)
    return {
        "viewer": me.user,
        "admin": me.admin,
        "generated_at": now,
        "staging": [
            staging_row(j, live)
            for j in session.scalars(unreleased.order_by(Job.id.desc()).limit(STAGING_SHOWN))
            if _inputs(j)
        ],
        "waits": [
            w
            for j in session.scalars(started.order_by(Job.started_at.desc()).limit(WAITS_SHOWN))
            for w in wait_rows(j, now)
        ],
        "errors": recent_errors(session, me),
        "jobs": [
            job_summary(j)
            for j in session.scalars(
                _mine(select(Job), me).order_by(Job.id.desc()).limit(JOBS_SHOWN)
            )
        ],
    }


def _mine(query: Select[Job], me: Identity) -> Select[Job]:
    """``query`` limited to ``me``'s jobs, loading their inputs in two more queries (not one
    per job: a page shows up to a few hundred)."""
    query = query.options(selectinload(Job.requests).selectinload(Request.stagings))
    return query if me.admin else query.where(Job.user == me.user)


def _inputs(job: Job) -> list[Staging]:
    return [st for r in job.requests if r.direction != "out" for st in r.stagings]


def staging_row(job: Job, live: Live) -> dict[str, Any]:
    """A job and its inputs' progress per node: files and bytes done of the totals known."""
    per_node: dict[str, list[Staging]] = {}
    for st in _inputs(job):
        per_node.setdefault(st.node, []).append(st)
    states = node_readiness(job)
    row = {k: v for k, v in job_summary(job).items() if k in _SUMMARY_KEYS}
    row["progress"] = {
        node: {"state": states.get(node, "staging"), **progress(sts, live)}
        for node, sts in sorted(per_node.items())
    }
    return row


_SUMMARY_KEYS = ("id", "kind", "job_id", "name", "user", "state", "nodes", "planned_nodes")


def progress(stagings: list[Staging], live: Live) -> dict[str, int | None]:
    """Files and bytes done over ``stagings`` (one node's inputs), with live counters of the
    running ones; a total is None until every input on the node has listed its source."""
    done = {"files_done": 0, "bytes_done": 0}
    totals: dict[str, int | None] = {"files_total": 0, "bytes_total": 0}
    for st in stagings:
        newer: Mapping[str, int] = live.get(st.id, {}) if st.state == "running" else {}
        done["files_done"] += newer.get("files_done", st.files_done)
        done["bytes_done"] += newer.get("bytes_done", st.bytes_done)
        for key in totals:
            value = newer.get(key, getattr(st, key))
            current = totals[key]
            totals[key] = None if value is None or current is None else current + value
    return {**done, **totals}


def wait_rows(job: Job, now: float) -> list[dict[str, Any]]:
    """Per node a started job ran on: seconds from its start until its inputs were all there.

    Positive: the job waited that long (at ``hpcstage env`` or the SPANK plugin); negative:
    the inputs were ready that long before it started; None while they are not (``inputs``
    says why: waiting, failed, or the job ended first; ``so_far``: seconds since the start).
    The daemon records when the inputs were ready and Slurm when the job started; the time
    ``hpcstage env`` returned is not recorded, so this is the wait a job asking at its start had.
    """
    if not _inputs(job) or job.started_at is None:
        return []
    ready, states = ready_times(job), node_readiness(job)
    return [
        {
            "id": job.id,
            "job_id": job.slurm_id,
            "user": job.user,
            "node": node,
            "started_at": job.started_at,
            "ready_at": ready.get(node),
            "waited": round(ready[node] - job.started_at, 1) if node in ready else None,
            "inputs": _wait_state(job, node in ready, states.get(node, "")),
            "so_far": round((job.ended_at or now) - job.started_at, 1),
        }
        for node in _split(job.nodes)
    ]


def _wait_state(job: Job, ready: bool, state: str) -> str:
    """ready | failed | waiting (still) | ended (the job ended before its inputs were ready)."""
    if ready or state == "failed":
        return "ready" if ready else "failed"
    return "waiting" if job.ended_at is None else "ended"


def recent_errors(session: Session, me: Identity) -> list[dict[str, Any]]:
    """The newest error events: of ``me``'s jobs, or (admins) of every job and the daemon."""
    query = (
        select(Event, Job)
        .outerjoin(Job, Event.job_id == Job.id)
        .where(Event.level == "error")
        .order_by(Event.id.desc())
        .limit(ERRORS_SHOWN)
    )
    if not me.admin:
        query = query.where(Job.user == me.user)
    return [
        {
            "ts": e.ts,
            "job_id": j.slurm_id if j else None,
            "user": j.user if j else "",
            "node": e.node,
            "message": e.message,
        }
        for e, j in session.execute(query)
    ]


def _split(text: str) -> list[str]:
    return [n for n in text.split(",") if n]

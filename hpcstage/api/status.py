"""Status documents: what ``hpcstage status``, the API and the dashboard show about a job."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hpcstage.core import plan as planner
from hpcstage.db import Event, Job, Staging
from hpcstage.watch.fold import interrupted

# What a job's staging looks like from the job's point of view, per node.
READY, FAILED, WAITING = "ready", "failed", "staging"


Live = Mapping[int, Mapping[str, int]]  # staging id -> counters newer than its row's


def job_document(
    session: Session, job: Job, events: int = 20, live: Live | None = None
) -> dict[str, Any]:
    """Everything about one job: Slurm state, each input per node, errors, recent events;
    ``live``: progress of running stagings not yet written to their rows."""
    doc = job_summary(job)
    live = live or {}
    doc["requests"] = [
        {
            "direction": r.direction,
            "src": r.src,
            "dest": r.dest,
            "line": r.line,
            "text": r.text,
            "nodes": {st.node: staging_document(st, live.get(st.id)) for st in r.stagings},
        }
        for r in job.requests
    ]
    query = select(Event).where(Event.job_id == job.id).order_by(Event.id.desc()).limit(events)
    doc["events"] = [
        {"ts": e.ts, "node": e.node, "level": e.level, "message": e.message}
        for e in reversed(list(session.scalars(query)))
    ]
    return doc


def job_summary(job: Job) -> dict[str, Any]:
    """One line's worth: ids, Slurm state, nodes, and staging state per node."""
    return {
        "id": job.id,
        "kind": job.kind,
        "job_id": job.slurm_id,
        "array_job_id": job.array_job_id,
        "array_task_id": job.array_task_id,
        "array_tasks": job.array_tasks,
        "name": job.name,
        "user": job.user,
        "account": job.account,
        "partition": job.partition,
        "state": job.state,
        "reason": job.state_reason,
        "planned_nodes": _split(job.planned_nodes),
        "nodes": _split(job.nodes),
        "expected_start": job.expected_start,
        "started_at": job.started_at,
        "ended_at": job.ended_at,
        "error": job.error,
        "directive_source": job.directive_source,
        "staging": node_readiness(job),
        "failure": job_failure(job),
        "stage_out": stage_out_summary(job),
        "ready_at": ready_times(job),
    }


def staging_document(st: Staging, live: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Progress of one input on one node (``live``: newer counters of a running one)."""
    doc = {
        "state": st.state,
        "files_done": st.files_done,
        "files_total": st.files_total,
        "bytes_done": st.bytes_done,
        "bytes_total": st.bytes_total,
        "fetched_files": st.fetched_files,
        "peer_files": st.peer_files,
        "error": st.error,
        "started_at": st.started_at,
        "finished_at": st.finished_at,
        "attempts": st.attempts,
        "files": [
            {
                "path": u.path,
                "key": u.key,
                "size": u.size,
                "state": u.state,
                "trash_key": u.trash_key,
                "error": u.error,
            }
            for u in st.uploads
        ],
    }
    if live and st.state == "running":
        doc.update(live)
    return doc


def node_readiness(job: Job) -> dict[str, str]:
    """Per node: ready (every input there), failed (one failed), or staging."""
    per_node: dict[str, list[str]] = {}
    for request in job.requests:
        if request.direction != "out":
            for st in request.stagings:
                per_node.setdefault(st.node, []).append(st.state)
    result = {}
    for node, states in per_node.items():
        state = planner.node_state(states)
        result[node] = {
            "ready": READY,
            "failed": FAILED,
            "released": "released",
            "dropped": "dropped",
        }.get(state, WAITING)
    return result


def ready_times(job: Job) -> dict[str, float]:
    """Per node where every input is ready: when the last one finished."""
    per_node: dict[str, list[Staging]] = {}
    for request in job.requests:
        if request.direction != "out":
            for st in request.stagings:
                per_node.setdefault(st.node, []).append(st)
    return {
        node: max(st.finished_at or 0 for st in sts)
        for node, sts in per_node.items()
        if all(st.state in ("ready", "released") and st.finished_at for st in sts)
    }


def job_failure(job: Job) -> str:
    """Why the job cannot get its inputs anywhere ('' while it still can)."""
    if job.error:
        return f"directive refused: {job.error}"
    for request in job.requests:
        for st in request.stagings:
            if st.state == "failed" and request.direction != "out":
                return st.error or f"{request.text}: failed"
    return ""


def stage_out_summary(job: Job) -> str:
    """none | pending | running | done | failed | skipped, over every stage-out directive
    (skipped too for a run Slurm requeued while it ran: its re-run writes the outputs)."""
    states = [st.state for r in job.requests if r.direction == "out" for st in r.stagings]
    if not any(r.direction == "out" for r in job.requests):
        return "none"
    if interrupted(job.state, job.replaced_at):
        return "skipped"
    if not states:
        return "pending"
    for state in ("running", "queued", "failed"):
        if state in states:
            return {"queued": "running"}.get(state, state)
    return "skipped" if all(s == "skipped" for s in states) else "done"


def _split(text: str) -> list[str]:
    return [n for n in text.split(",") if n]

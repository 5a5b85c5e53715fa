"""The planner's view of the unreleased jobs, read as plain columns (hpcstage/watch/tickview.py),
against the view built from ORM objects as the daemon did before (4f7f2a1's Daemon._views,
copied below as the reference), on random states in a real SQLite database."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from hpcstage.core import plan as planner
from hpcstage.core.directives import location
from hpcstage.core.overlap import overlaps
from hpcstage.db import Job, Request, Staging, open_db
from hpcstage.watch import tickview
from hpcstage.watch.fold import split_nodes
from hpcstage.watch.slurm.model import JobInfo, QueueSnapshot

STATES = ["queued", "running", "ready", "failed", "released", "skipped"]
NODES = ["n1", "n2", "n3", "-"]
LOCATIONS = ["s3://b/a", "s3://b/a/", "s3://b/ab/", "s3://b/a/x", "s3://c/", "/shared/p/", ""]
# Inputs with a filter or a pinned version overlap as the place they read.
LOCATIONS += ["s3://b/a/?include=x/**", "s3://b/a/x?versionId=v1"]


def _job_key(job: Job) -> str:
    return str(job.slurm_id) if job.kind == "job" else f"warmup-{job.id}"


def _node_states(job: Job) -> dict[str, str]:
    per_node: dict[str, list[str]] = {}
    for request in job.requests:
        if request.direction == "out":
            continue
        for st in request.stagings:
            per_node.setdefault(st.node, []).append(st.state)
    return {node: planner.node_state(states) for node, states in per_node.items()}


def _out_state(job: Job) -> str:
    outs = [r for r in job.requests if r.direction == "out"]
    if not outs:
        return "none"
    states = [st.state for r in outs for st in r.stagings]
    if len(states) < len(outs):
        return "pending"
    for state in ("running", "queued", "failed"):
        if state in states:
            return state
    return "done"


def reference_views(session: Session) -> list[planner.JobView]:
    jobs = list(session.scalars(select(Job).where(Job.released_at.is_(None))))
    outputs = [
        (r.dest, _job_key(job))
        for job in jobs
        if _out_state(job) in ("pending", "queued", "running")
        and (job.started_at is not None or job.ended_at is not None)
        for r in job.requests
        if r.direction == "out"
    ]

    def waits_for(job: Job) -> str:
        for r in job.requests:
            if r.direction != "in":
                continue
            for dest, other in outputs:
                if other != _job_key(job) and overlaps(location(r.src), dest):
                    return other
        return ""

    return [
        planner.JobView(
            id=job.id,
            kind=job.kind,
            state=job.state,
            priority=job.priority,
            expected_start=job.expected_start,
            planned_nodes=split_nodes(job.planned_nodes),
            nodes=split_nodes(job.nodes),
            ended_at=job.ended_at,
            released=job.released_at is not None,
            error=job.error,
            node_states=_node_states(job),
            out_state=_out_state(job),
            out_node=job.batch_host or next(iter(split_nodes(job.nodes)), ""),
            waits_for=waits_for(job),
            inputs=next((r.src for r in job.requests if r.direction == "in" and r.src), ""),
            replaced=job.replaced_at is not None,
        )
        for job in jobs
    ]


def random_state(rng: random.Random, session: Session) -> None:
    for j in range(rng.randint(0, 12)):
        kind = rng.choice(["job", "job", "warmup"])
        replaced = kind == "job" and rng.random() < 0.2  # its id taken over by a newer job
        job = Job(
            kind=kind,
            slurm_job_id=100 + j if kind == "job" and not replaced else None,
            former_slurm_job_id=100 + j if replaced else None,
            replaced_at=5.0 if replaced else None,
            user="u",
            state=rng.choice(["PENDING", "RUNNING", "COMPLETED", "WARMUP"]),
            priority=rng.randint(0, 5),
            expected_start=rng.choice([None, 10.0]),
            started_at=rng.choice([None, 5.0]),
            ended_at=rng.choice([None, None, 9.0]),
            planned_nodes=",".join(rng.sample(NODES[:3], rng.randint(0, 2))),
            nodes=",".join(rng.sample(NODES[:3], rng.randint(0, 2))),
            batch_host=rng.choice(["", "n2"]),
            error=rng.choice(["", "", "refused"]),
            released_at=rng.choice([None, None, None, 7.0]),
        )
        positions = list(range(rng.randint(0, 6)))
        rng.shuffle(positions)
        for position in positions:
            direction = rng.choice(["in", "in", "out", "dir"])
            request = Request(
                direction=direction,
                position=position,
                src=rng.choice(LOCATIONS),
                dest=rng.choice(LOCATIONS),
            )
            request.stagings = [
                Staging(node=node, state=rng.choice(STATES))
                for node in rng.sample(NODES, rng.randint(0, 3))
            ]
            job.requests.append(request)
        session.add(job)


def by_id(views: list[planner.JobView]) -> dict[int, planner.JobView]:
    return {v.id: v for v in views}


@pytest.mark.parametrize("seed", range(40))
def test_the_column_read_gives_the_planner_what_the_orm_read_gave(
    tmp_path: Path, seed: int
) -> None:
    db = open_db(f"sqlite:///{tmp_path / 'state.db'}")
    rng = random.Random(seed)  # noqa: S311 - reproducible test data
    try:
        with db.begin() as session:
            random_state(rng, session)
        with db.begin() as session:
            expected = by_id(reference_views(session))
        with db.begin() as session:
            got = by_id(tickview.read_views(session))
    finally:
        db.kw["bind"].dispose()  # Python 3.13 warns of sqlite connections left open
    assert got.keys() == expected.keys()
    for job_id, view in got.items():
        want = expected[job_id]
        # Whom a job waits for may be any one of the jobs it waits for.
        assert bool(view.waits_for) == bool(want.waits_for), job_id
        assert view == dataclasses.replace(want, waits_for=view.waits_for)


def _running(job_id: int, node: str, end: float) -> JobInfo:
    return JobInfo(
        job_id, None, None, "busy", "bob", None, "acct", "batch", "RUNNING", "", 0,
        0.0, 0.0, end, (node,), (), node, "", "", "/", None,
    )  # fmt: skip


def test_hedges_are_the_partitions_nodes_that_free_first(tmp_path: Path) -> None:
    """Issue 18: a pending job staged on its planned node n3 is hedged on n2 (ends first)."""
    db = open_db(f"sqlite:///{tmp_path / 'state.db'}")
    snapshot = QueueSnapshot(
        0.0, "24.11", (_running(1, "n1", 300.0), _running(2, "n2", 200.0), _running(3, "n3", 100.0))
    )
    try:
        with db.begin() as session:
            job = Job(
                kind="job", slurm_job_id=7, user="u", state="PENDING", partition="batch",
                planned_nodes="n3",
            )  # fmt: skip
            request = Request(direction="in", position=0, src="s3://b/a/", dest="a")
            request.stagings = [Staging(node="n3", state="ready", bytes_done=100)]
            job.requests.append(request)
            session.add(job)
        with db.begin() as session:
            views = tickview.read_views(session)
            hedged = tickview.with_hedges(session, views, snapshot, 1, 1000)
            too_big = tickview.with_hedges(session, views, snapshot, 1, 99)
    finally:
        db.kw["bind"].dispose()
    assert [v.hedge for v in hedged] == [("n2",)]
    assert [v.hedge for v in too_big] == [()]

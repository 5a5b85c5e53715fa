"""The planner's view of every unreleased job, read as plain columns in four queries.

A tick used to load each job's requests and each request's stagings as ORM objects: two
objects per directive, which held the event loop for long stretches once jobs had thousands
of directives (timings in docs/benchmarks.md, "The overlap check of one tick"), and meanwhile
the API answered nobody. The planner
needs far less: per job and node, which staging states occur; per job, how many stage-outs
there are and which states their stagings are in; the stage-in sources and the stage-out
destinations (for the overlap index). Those come as rows and tuples here, grouped in SQL
where a count or a set is all that is needed; the assembly is pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hpcstage.core import directives as dirs
from hpcstage.core import hedge, overlap
from hpcstage.core import plan as planner
from hpcstage.db import Job, Request, Staging
from hpcstage.watch.fold import interrupted, split_nodes
from hpcstage.watch.slurm.model import QueueSnapshot

UNFINISHED = ("pending", "queued", "running")  # stage-out states other jobs wait for


@dataclass(frozen=True)
class _JobRow:
    """The columns of one job the planner needs, in the order of ``_JOB_COLUMNS``."""

    id: int
    kind: str
    slurm_job_id: int | None
    state: str
    priority: int
    expected_start: float | None
    planned_nodes: str
    nodes: str
    ended_at: float | None
    started_at: float | None
    error: str
    batch_host: str
    former_slurm_job_id: int | None
    replaced_at: float | None


_JOB_COLUMNS = (
    Job.id,
    Job.kind,
    Job.slurm_job_id,
    Job.state,
    Job.priority,
    Job.expected_start,
    Job.planned_nodes,
    Job.nodes,
    Job.ended_at,
    Job.started_at,
    Job.error,
    Job.batch_host,
    Job.former_slurm_job_id,
    Job.replaced_at,
)


@dataclass
class _Directives:
    """What one job's requests and stagings add up to."""

    node_states: dict[str, set[str]] = field(default_factory=dict)  # stage-in side
    out_states: set[str] = field(default_factory=set)
    out_stagings: int = 0
    outputs: list[str] = field(default_factory=list)  # stage-out destinations
    per_node_outputs: int = 0  # of them, those naming the node (%n, %N): one per node
    inputs: list[str] = field(default_factory=list)  # stage-in sources, in position order


def job_key(j: _JobRow) -> str:
    """How agents, the recycle bin and other jobs name a job (as staging.records.key_of): its Slurm
    id, also after a newer job took that over (Job.slurm_id)."""
    if j.kind != "job":
        return f"{j.kind}-{j.id}"
    return str(j.slurm_job_id if j.slurm_job_id is not None else j.former_slurm_job_id)


def out_state(outputs: int, stagings: int, states: Iterable[str]) -> str:
    """Stage-out as one word: none | pending | queued | running | failed | done, from the
    number of stage-out directives, of their stagings, and the states those are in."""
    if not outputs:
        return "none"
    if stagings < outputs:
        return "pending"
    found = set(states)
    return next((s for s in ("running", "queued", "failed") if s in found), "done")


def read_views(session: Session) -> list[planner.JobView]:
    """Every unreleased job as the planner sees it."""
    query = select(*_JOB_COLUMNS).where(Job.released_at.is_(None))
    jobs = [_JobRow(*cast(tuple[Any, ...], row)) for row in session.execute(query)]
    found = _directives(session)
    keys = {j.id: job_key(j) for j in jobs}
    index = overlap.OutputIndex(
        (_before_node(dest), keys[j.id])
        for j in jobs
        if (j.started_at is not None or j.ended_at is not None)
        and _out_of(j, found.get(j.id) or _Directives()) in UNFINISHED
        for dest in found[j.id].outputs
    )
    return [_view(j, found.get(j.id) or _Directives(), keys[j.id], index) for j in jobs]


def _before_node(dest: str) -> str:
    """An output naming the node (%N, %n: expanded per node only when written back) covers
    everything under its DEST up to the component that names the node."""
    if not dirs.names_node(dest):
        return dest
    head = dest[: dest.index("%")]
    return head[: head.rfind("/") + 1]


def _out_of(j: _JobRow, d: _Directives) -> str:
    """The job's stage-out as one word: "none" for a run Slurm requeued while it ran (its
    re-run writes the outputs), else ``_out_on`` the nodes it ran on."""
    if interrupted(j.state, j.replaced_at):
        return "none"
    return _out_on(d, split_nodes(j.nodes))


def _out_on(d: _Directives, nodes: tuple[str, ...]) -> str:
    """``_out``, where an output naming the node has one staging per node of the job."""
    wanted = len(d.outputs) + d.per_node_outputs * (max(len(nodes), 1) - 1)
    return out_state(wanted, d.out_stagings, d.out_states)


def _view(j: _JobRow, d: _Directives, key: str, index: overlap.OutputIndex) -> planner.JobView:
    nodes = split_nodes(j.nodes)
    return planner.JobView(
        id=j.id,
        kind=j.kind,
        state=j.state,
        priority=j.priority,
        expected_start=j.expected_start,
        planned_nodes=split_nodes(j.planned_nodes),
        nodes=nodes,
        ended_at=j.ended_at,
        released=False,
        error=j.error,
        node_states={n: planner.node_state(s) for n, s in d.node_states.items()},
        out_state=_out_of(j, d),
        out_node=j.batch_host or next(iter(nodes), ""),
        # Outputs naming the node are written back from every node the job ran on.
        out_nodes=nodes if d.per_node_outputs and len(nodes) > 1 else (),
        waits_for=overlap.waits_for(dict.fromkeys(map(dirs.location, d.inputs)), key, index),
        inputs=next((src for src in d.inputs if src), ""),
        replaced=j.replaced_at is not None,
    )


def _directives(session: Session) -> dict[int, _Directives]:
    """Per unreleased job: its staging states (grouped), sources and destinations."""
    found: dict[int, _Directives] = {}
    unreleased = Job.released_at.is_(None)
    states = (
        select(Request.job_id, Request.direction, Staging.node, Staging.state, func.count())
        .join(Staging, Staging.request_id == Request.id)
        .join(Job, Job.id == Request.job_id)
        .where(unreleased)
        .group_by(Request.job_id, Request.direction, Staging.node, Staging.state)
    )
    for job_id, direction, node, state, count in session.execute(states):
        d = found.setdefault(job_id, _Directives())
        if direction == "out":
            d.out_states.add(state)
            d.out_stagings += count
        else:
            d.node_states.setdefault(node, set()).add(state)
    locations = (
        select(Request.job_id, Request.direction, Request.src, Request.dest, Request.dest_template)
        .join(Job, Job.id == Request.job_id)
        .where(unreleased, Request.direction.in_(("in", "out")))
        .order_by(Request.job_id, Request.position, Request.id)
    )
    for job_id, direction, src, dest, template in session.execute(locations):
        d = found.setdefault(job_id, _Directives())
        if direction == "in":
            d.inputs.append(src)
        else:
            d.outputs.append(dest)
            d.per_node_outputs += dirs.names_node(template)
    return found


def with_hedges(
    session: Session,
    views: list[planner.JobView],
    snapshot: QueueSnapshot,
    count: int,
    max_bytes: int,
) -> list[planner.JobView]:
    """``views`` with the hedge nodes of each pending job planned and staged there
    (core/hedge.py): the ``count`` nodes of its partition that free first."""
    ready = [
        v.id
        for v in views
        if v.kind == "job" and v.planned_nodes and v.state not in planner.RUNNING_JOB_STATES
    ]
    if count <= 0 or not ready:
        return views
    frees = hedge.free_at(
        hedge.Busy(j.partition, j.nodes, j.end_time)
        for j in snapshot.jobs
        if j.state in planner.RUNNING_JOB_STATES
    )
    partitions = {
        job_id: partition
        for job_id, partition in session.execute(
            select(Job.id, Job.partition).where(Job.id.in_(ready))
        )
    }
    # The size of each job's inputs as staged on each node that holds them.
    staged: dict[tuple[int, str], int] = {}
    for job_id, node, size in session.execute(
        select(Request.job_id, Staging.node, func.sum(Staging.bytes_done))
        .join(Staging, Staging.request_id == Request.id)
        .where(Request.job_id.in_(ready), Request.direction == "in", Staging.state == "ready")
        .group_by(Request.job_id, Staging.node)
    ):
        staged[job_id, node] = int(size or 0)
    out = []
    for view in views:
        if view.id in partitions:
            size = max((staged.get((view.id, n), 0) for n in view.planned_nodes), default=0)
            frees_here = frees.get(partitions[view.id], {})
            nodes = hedge.hedge_nodes(view, frees_here, count, size, max_bytes)
            view = dataclasses.replace(view, hedge=nodes) if nodes else view
        out.append(view)
    return out

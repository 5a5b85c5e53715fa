"""Heterogeneous jobs: their components folded into one record under the leader's id (pure).

Slurm lists every component of a heterogeneous job (``#SBATCH hetjob`` between the
components' options, ``sbatch --het``) as a job record of its own: the leader has the het
job's id (``het_job_offset`` 0), the others the ids after it, each with its own planned and
allocated nodes (22.05 and 24.11 alike; recorded in ``tests/golden/slurm-22.05/squeue-het.json``).
To hpcstage the components are one job:

1. Its directives are the leader's: only the leader carries the batch script, and
   job_submit.lua's ``admin_comment``.
2. Its nodes are every component's, in component order (a node two components share
   once): each node gets the job's inputs, and each node's ``hpcstage env`` finds them,
   since a step of any component has the leader's id as ``SLURM_JOB_ID``.
3. Its state is the leader's, until the leader has ended and another component has not:
   then that component's (the job's directories are released only when all are over).
4. Its batch host is the leader's (the batch script runs there): outputs are written back
   once, from there, and an output naming the node (``%N``, ``%n``) from every node.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from hpcstage.watch.slurm.model import FINISHED_STATES, JobInfo, QueueSnapshot


def merge_het_jobs(snapshot: QueueSnapshot) -> QueueSnapshot:
    """The snapshot with each het job's components folded into its leader's record."""
    components: dict[int, list[JobInfo]] = {}
    for job in snapshot.jobs:
        if job.het_job_id is not None:
            components.setdefault(job.het_job_id, []).append(job)
    if not components:
        return snapshot
    jobs = tuple(
        het_job(components[job.job_id]) if job.het_job_id == job.job_id else job
        for job in snapshot.jobs
        # A component that is not the leader is in the leader's record.
        if job.het_job_id is None or job.het_job_id == job.job_id
    )
    return replace(snapshot, jobs=jobs)


def het_job(components: Iterable[JobInfo]) -> JobInfo:
    """One record for a het job from its components' records (the leader among them)."""
    parts = sorted(components, key=lambda job: job.het_job_offset or 0)
    leader = parts[0]
    if len(parts) == 1:
        return leader
    shown = leader
    if leader.state in FINISHED_STATES:
        shown = next((p for p in parts if p.state not in FINISHED_STATES), leader)
    return replace(
        leader,
        state=shown.state,
        state_flags=shown.state_flags,
        state_reason=shown.state_reason,
        exit_code=shown.exit_code,
        nodes=_union(part.nodes for part in parts),
        planned_nodes=_union(part.planned_nodes for part in parts),
    )


def _union(node_lists: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    """Every node of the lists, in their order, each once."""
    return tuple(dict.fromkeys(node for nodes in node_lists for node in nodes))

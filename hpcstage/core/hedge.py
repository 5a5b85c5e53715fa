"""Hedging: stage a pending job's inputs on the nodes likeliest to run it besides its plan.

Slurm's plan (SchedNodeList) is advisory: when the busy jobs of a partition end together,
or end early, the job starts wherever nodes free up first, and then it waits at
``hpcstage env`` while its node is topped up. Where the inputs are small beside the cache,
the daemon also stages them on the ``count`` nodes of the job's partition whose running
jobs are expected to end first (``cache.hedge_nodes``, ``cache.hedge_bytes``), copied from
the planned node once that holds them (peer copy: the store serves them once); when the job
starts, the views on the nodes it did not get are released like a moved plan's.

Pure: the daemon hands in the queue snapshot's running jobs and the job's staged size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hpcstage.core.plan import RUNNING_JOB_STATES, JobView


@dataclass(frozen=True)
class Busy:
    """A running job of the snapshot: its partition, nodes and expected end (None: unset)."""

    partition: str
    nodes: tuple[str, ...]
    end_time: float | None


def free_at(running: Iterable[Busy]) -> dict[str, dict[str, float]]:
    """Per partition, per node: when the node is expected to be free (its last running
    job's expected end; a job without one never ends, as far as we know)."""
    found: dict[str, dict[str, float]] = {}
    for job in running:
        end = job.end_time if job.end_time is not None else float("inf")
        nodes = found.setdefault(job.partition, {})
        for node in job.nodes:
            nodes[node] = max(nodes.get(node, 0.0), end)
    return found


def hedge_nodes(
    job: JobView, frees: Mapping[str, float], count: int, staged: int, max_bytes: int
) -> tuple[str, ...]:
    """The nodes besides its plan to stage ``job``'s inputs on too: the ``count`` of
    ``frees`` (its partition's nodes, by expected free time) that free first.

    Only for a pending job whose planned nodes hold its inputs already (``staged`` bytes, at
    most ``max_bytes``): the hedges then copy from there, and the size is known.
    """
    if count <= 0 or job.kind != "job" or job.state in RUNNING_JOB_STATES:
        return ()
    if not job.planned_nodes or not 0 < staged <= max_bytes:
        return ()
    if any(job.node_states.get(n) != "ready" for n in job.planned_nodes):
        return ()
    others = sorted((n for n in frees if n not in job.planned_nodes), key=lambda n: (frees[n], n))
    return tuple(n for n in others if frees[n] != float("inf"))[:count]

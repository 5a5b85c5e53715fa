"""The planner: pure decisions over plain data. What goes to which node, when; what is released.

Inputs are snapshots of the daemon's state (``JobView``), outputs are actions the executor
carries out. Nothing here touches Slurm, agents or the database, so every rule is a unit test.

Rules, in order of precedence:
1. A job whose directives were refused, or one of whose inputs failed on some node, gets
   nothing more staged (its ``hpcstage env`` fails with that error). A failure of the node
   itself (unreachable for good, its disk or cache failing, its quota full) before the job
   runs there only drops that node (``dropped``): it is not staged again while the job is
   pending, and gets one fresh attempt if Slurm starts the job on it anyway. A kept-warm
   dataset's failure on a node (after the usual retries) stops that node only.
2. A running job is staged on the nodes it actually got, at once (Slurm's plan is advisory).
3. A pending job is staged on the nodes the backfill scheduler plans for it; when the plan
   moves, the old nodes' views are released (their objects stay cached, unleased). A
   pending job Slurm has planned no nodes for is staged on one node of the cache cluster
   (if the site has one), chosen by its inputs so that jobs sharing a dataset share the node;
   that view is released once the job is planned or starts, and the nodes it gets copy the
   small objects from there (peer copy, in the executor).
   Where the site has Slurm power saving (``awake`` given), a node that is powered down or
   booting has no agent: it is not staged (nor failed, nor dropped) until it is up. While
   every node a job is planned for or got sleeps, the job's inputs wait on a node that is up
   and already holds them (a running peer: an earlier plan's node), else on its cache-cluster
   node as in rule 3; the job's node copies them from there once Slurm has resumed it.
   A warmup or kept-warm dataset is staged on the nodes its user named only, each once it
   is up: until then nothing reaches for the node, and a warmup is not done.
   A view on a node that powers down later (the job still pending, or a kept-warm dataset)
   may be gone when the node is back (a cloud node's disk is new at each boot): it is marked
   to be staged again (``Restage``), which happens once the node is up (the stage finds
   whatever the cache kept and only builds the view again).
   With hedging (``JobView.hedge``, core/hedge.py), a pending job is also staged on the
   nodes likeliest to free first for it; once it runs, those it did not get are released.
4. A warmup is staged on its nodes (into the cache only: the agent builds no view for it),
   then released right away: warm data stays cached but holds no lease. A kept-warm dataset
   (``hpcstage pin``, kind ``pin``) is staged on its nodes with a view, whose links lease it,
   and keeps it until the pin is removed (it then ends, as a job without a lease grace).
5. An ended job's outputs are staged out at once, from its batch host (an output naming the
   node, %n or %N, from every node the job ran on: each under its own name); a run Slurm
   requeued while it ran has none to stage out (``out_state`` "none": its re-run writes
   them, see hpcstage.watch.fold.interrupted) and is ``replaced``; its views are
   released only after every output is verified in the store, and after the lease grace
   period (at once if Slurm gave its id to a newer job, ``replaced``). A failed stage-out
   keeps the job's directory (and its lease) for the admin.
A job whose input is the destination of another job's unfinished stage-out (a pipeline
with --dependency) waits until those outputs are verified in the store.
Stage actions come out ordered: running jobs first, then by expected start, then priority;
at most ``max_per_node`` stage operations run on one node at a time.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# Staging states, per (request, node): queued -> running -> ready | failed | dropped (the
# node failed, not the data: see rule 1); then released.
IN_FLIGHT = "running"
DONE_STATES = frozenset({"ready", "failed"})
RUNNING_JOB_STATES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"})


@dataclass(frozen=True)
class JobView:
    """What the planner needs to know about one job."""

    id: int
    kind: str  # job | warmup | pin
    state: str
    priority: int = 0
    expected_start: float | None = None
    planned_nodes: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    ended_at: float | None = None
    released: bool = False
    error: str = ""
    # Aggregated state per node over the job's stage-in requests (see node_state()).
    node_states: Mapping[str, str] = field(default_factory=dict)
    # Stage-out: none (no directive) | pending | queued | running | done | failed.
    out_state: str = "none"
    out_node: str = ""  # where the outputs are: the batch host
    # Every node the job ran on, when an output names the node (%n, %N): each writes its own.
    out_nodes: tuple[str, ...] = ()
    # An input is another job's output whose stage-out is not verified yet: wait for it.
    waits_for: str = ""
    # The job's first input (its source URL): places it on the cache cluster.
    inputs: str = ""
    # Slurm gave the job's id to a newer job: nothing can requeue this one, and the newer
    # one needs the job directories that are named by the id, so no lease grace.
    replaced: bool = False
    # Nodes besides its plan a pending job is staged on too, those likeliest to free first
    # (core/hedge.py); ignored once it runs, so their views are released like a moved plan's.
    hedge: tuple[str, ...] = ()


@dataclass(frozen=True, order=True)
class Stage:
    """Bring every input of ``job_id`` to ``node`` and build its view there."""

    sort_key: tuple[int, float, int]
    job_id: int
    node: str
    reason: str


@dataclass(frozen=True)
class Release:
    """Remove the view of ``job_id`` on ``node``: its lease ends, the objects stay cached."""

    job_id: int
    node: str
    reason: str


@dataclass(frozen=True)
class StageOut:
    """Upload the outputs of the ended job ``job_id`` from ``node`` (its batch host)."""

    job_id: int
    node: str
    reason: str


@dataclass(frozen=True)
class Restage:
    """``job_id``'s view on ``node`` may be gone (the node powered down): stage it again
    once the node is up (an executor writes this down, it does not reach the node)."""

    job_id: int
    node: str
    reason: str


@dataclass(frozen=True)
class MarkReleased:
    """Every view of ``job_id`` is gone: record it so the job is not looked at again."""

    job_id: int


Action = Stage | Release | StageOut | Restage | MarkReleased


def node_state(request_states: Iterable[str]) -> str:
    """One state for a node from its requests' states: failed > running > queued > ready."""
    states = set(request_states)
    for state in ("failed", "running", "dropped", "queued", "released"):
        if state in states:
            return state
    return "ready" if states else "absent"


def plan(
    jobs: Iterable[JobView],
    now: float,
    grace: float,
    inflight: Mapping[str, int],
    max_per_node: int = 4,
    cache_nodes: Sequence[str] = (),
    awake: Container[str] | None = None,
) -> list[Action]:
    """Every action to take now, stage actions first in priority order.

    ``awake``: the Slurm nodes that are up, where the site has power saving (None: every
    node counts as up); cache-cluster nodes always do.
    """
    stages: list[Stage] = []
    others: list[Action] = []
    for job in jobs:
        if job.ended_at is not None or (job.kind == "warmup" and _warm(job)):
            others.extend(_end(job, now, grace))
            continue
        others.extend(_restage(job, cache_nodes, awake))
        stages.extend(_stage(job, cache_nodes, awake))
        others.extend(_retarget(job, cache_nodes, awake))
    return [*_bounded(sorted(stages), inflight, max_per_node), *others]


def targets(
    job: JobView, cache_nodes: Sequence[str] = (), awake: Container[str] | None = None
) -> tuple[str, ...]:
    """The nodes a job's inputs should be on now."""
    wanted = _hedged(job, _wanted(job, cache_nodes))
    if awake is None:
        return wanted
    up = tuple(n for n in wanted if n in awake or n in cache_nodes)
    if up or not wanted or job.kind != "job":  # a warmup or pin waits for its own nodes
        return up
    # Every node of the job sleeps: keep its inputs where they are up already, else hold
    # them on the cache cluster, until Slurm has resumed a node (rule 3).
    holding = tuple(
        n
        for n, s in job.node_states.items()
        if s in ("ready", "running") and (n in awake or n in cache_nodes)
    )
    held = cache_node(job.inputs, cache_nodes)
    return holding or ((held,) if held else ())


def sleeping(
    job: JobView, cache_nodes: Sequence[str] = (), awake: Container[str] | None = None
) -> tuple[str, ...]:
    """The nodes the job is planned for or got that are powered down or booting."""
    if awake is None:
        return ()
    return tuple(n for n in _wanted(job, cache_nodes) if n not in awake and n not in cache_nodes)


def _wanted(job: JobView, cache_nodes: Sequence[str]) -> tuple[str, ...]:
    """The nodes Slurm gave or planned for the job (rules 2-4), awake or not."""
    if job.kind == "job" and job.state in RUNNING_JOB_STATES and job.nodes:
        return job.nodes
    if job.planned_nodes or job.kind != "job" or job.state in RUNNING_JOB_STATES:
        return job.planned_nodes
    if any(n not in cache_nodes and s != "released" for n, s in job.node_states.items()):
        return ()  # staged for an earlier plan: keep that, the plan may come back
    held = cache_node(job.inputs, cache_nodes)
    return (held,) if held else ()


def _hedged(job: JobView, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """``wanted`` and, while the job is pending on its plan, its hedge nodes."""
    if not job.hedge or job.state in RUNNING_JOB_STATES or not job.planned_nodes:
        return wanted
    return (*wanted, *(n for n in job.hedge if n not in wanted))


def cache_node(inputs: str, cache_nodes: Sequence[str]) -> str:
    """The cache-cluster node that holds ``inputs`` for jobs not planned yet ("": none).

    A stable hash of the source, so every job needing a dataset asks the same node for it.
    """
    if not inputs or not cache_nodes:
        return ""
    return cache_nodes[zlib.crc32(inputs.encode()) % len(cache_nodes)]


def _stage(
    job: JobView, cache_nodes: Sequence[str] = (), awake: Container[str] | None = None
) -> list[Stage]:
    # A refused directive or a failed input (missing object, refused credentials) fails the
    # job wherever it runs: staging it on yet another node would only repeat the failure.
    # A pin cannot be dropped from its nodes: a failure there stops that node alone (the
    # pin's next scheduled refresh tries it again), the others are kept warm.
    failed = "failed" in job.node_states.values() and job.kind != "pin"
    if job.error or failed or job.waits_for:
        return []
    running = job.kind == "job" and job.state in RUNNING_JOB_STATES
    key = (0 if running else 1, job.expected_start or math.inf, -job.priority)
    reason = "job started here" if running else "planned by Slurm"
    if job.kind == "warmup":
        reason = "warmup"
    elif job.kind == "pin":
        reason = "kept warm"
    elif not running and not job.planned_nodes:
        reason = "no nodes planned yet: held on the cache cluster"
    asleep = sleeping(job, cache_nodes, awake)
    if asleep and len(asleep) == len(_wanted(job, cache_nodes)):
        reason = f"{', '.join(asleep)} powered down or booting: held here until it is up"
    # A dropped node is tried again only once the job runs there (then its failure is final).
    again = ("absent", "queued", "released", *(("dropped",) if running else ()))
    hedge = "hedge: among the nodes likeliest to free first for it"
    return [
        Stage(key, job.id, node, hedge if node in job.hedge and not running else reason)
        for node in targets(job, cache_nodes, awake)
        if job.node_states.get(node, "absent") in again
    ]


def _restage(
    job: JobView, cache_nodes: Sequence[str] = (), awake: Container[str] | None = None
) -> list[Action]:
    """Views on nodes that powered down since they were staged: built again once up."""
    if awake is None or job.kind == "warmup":  # a warmup has no view, its cache may stay
        return []
    return [
        Restage(
            job.id,
            node,
            f"{node} powered down: its view is staged again once it is up"
            " (a booted node's cache may be empty)",
        )
        for node, state in job.node_states.items()
        if state == "ready" and node not in awake and node not in cache_nodes
    ]


def _retarget(
    job: JobView, cache_nodes: Sequence[str] = (), awake: Container[str] | None = None
) -> list[Action]:
    """Release views on nodes a pending job is no longer planned for."""
    keep = set(targets(job, cache_nodes, awake)) | set(sleeping(job, cache_nodes, awake))
    if not keep:  # no plan at all right now: keep what we have, it may come back
        return []
    return [
        Release(
            job.id,
            node,
            "the job has nodes now (they copy from the cache cluster)"
            if node in cache_nodes
            else "Slurm's plan moved the job elsewhere",
        )
        for node, state in job.node_states.items()
        if node not in keep and state in ("ready", "dropped")
    ]


def _warm(job: JobView) -> bool:
    states = [job.node_states.get(node, "absent") for node in job.planned_nodes]
    return bool(states) and all(state in (*DONE_STATES, "released") for state in states)


def _end(job: JobView, now: float, grace: float) -> list[Action]:
    if job.released:
        return []
    if job.kind == "job" and job.out_state in ("pending", "queued"):
        return [StageOut(job.id, node, "job ended") for node in job.out_nodes or (job.out_node,)]
    if job.out_state in ("running", "failed"):
        # Outputs stay on the node, leased, until verified in the store. A failed stage-out
        # keeps them there for the admin (`hpcstage status` says where): nothing is lost.
        return []
    in_grace = job.ended_at is not None and now < job.ended_at + grace
    if job.kind == "job" and in_grace and not job.replaced:
        return []
    live = [n for n, s in job.node_states.items() if s not in ("released", "running", "absent")]
    if any(s == IN_FLIGHT for s in job.node_states.values()):
        return []  # let the transfer finish; release on a later tick
    why = {"warmup": "warmup done", "pin": "no longer kept warm"}.get(
        job.kind, "job ended, lease grace over"
    )
    if job.kind == "job" and job.replaced:
        why = "Slurm runs the job again, or gave its id to a newer job: released at once"
    actions: list[Action] = [Release(job.id, node, why) for node in live]
    # Done only once every view is gone (a failed release is retried at the next tick);
    # failed inputs keep their state on record, so they do not hold this up.
    if all(job.node_states[node] == "failed" for node in live):
        actions.append(MarkReleased(job.id))
    return actions


def _bounded(stages: list[Stage], inflight: Mapping[str, int], limit: int) -> list[Stage]:
    load = dict(inflight)
    chosen = []
    for action in stages:
        if load.get(action.node, 0) < limit:
            load[action.node] = load.get(action.node, 0) + 1
            chosen.append(action)
    return chosen

"""What hpcstage knows about Slurm: plain frozen records, the same for every Slurm version.

Job states use the vocabulary of ``squeue -o %T``: a state flag that Slurm shows instead of the
base state (``COMPLETING``, ``CONFIGURING``, ...) wins, in Slurm's own order of precedence.  That
is what 22.05 prints in its JSON and scontrol output; 24.11's list form is reduced the same way,
and every flag it lists is kept in ``state_flags``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Base states a job ends in (it will not run again unless requeued).
FINISHED_STATES = frozenset(
    {
        "COMPLETED",
        "CANCELLED",
        "FAILED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
    }
)

#: Every base state (Slurm's JOB_STATE_BASE values).
BASE_STATES = frozenset({"PENDING", "RUNNING", "SUSPENDED"}) | FINISHED_STATES

#: State flags in the order Slurm's job_state_string() tests them: the first present is shown.
STATE_FLAG_PRECEDENCE = (
    "COMPLETING",
    "STAGE_OUT",
    "CONFIGURING",
    "RESIZING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "SPECIAL_EXIT",
    "STOPPED",
    "REVOKED",
    "RESV_DEL_HOLD",
    "SIGNALING",
)


@dataclass(frozen=True)
class JobInfo:
    """One job as seen in a queue snapshot.  Times are unix seconds, None when unset."""

    job_id: int
    array_job_id: int | None
    array_task_id: int | None
    name: str
    user: str
    uid: int | None
    account: str
    partition: str
    state: str
    state_reason: str
    priority: int
    submit_time: float | None
    start_time: float | None  # actual start, or the expected one while pending
    end_time: float | None  # actual end, or the expected one (start + time limit)
    nodes: tuple[str, ...]  # allocated nodes, expanded
    planned_nodes: tuple[str, ...]  # SchedNodeList: the backfill scheduler's advisory plan
    batch_host: str
    admin_comment: str
    comment: str
    work_dir: str
    exit_code: int | None  # return code, 128+signal if killed; None until the job finished
    state_flags: tuple[str, ...] = ()
    restarts: int = 0  # times Slurm requeued it (each gives it a new submit time)
    # An array's record of its tasks not yet started, as Slurm writes them ("4-19%2"); "" else.
    array_tasks: str = ""
    # A heterogeneous job's component: the leader's job id and this component's number (the
    # leader is 0); None for other jobs. See het.py: the daemon sees one record per het job.
    het_job_id: int | None = None
    het_job_offset: int | None = None

    @property
    def pending(self) -> bool:
        """True while the job waits for resources (its inputs may be staged ahead)."""
        return self.state == "PENDING"

    @property
    def finished(self) -> bool:
        """True once the job reached a final base state and no epilog is still running."""
        return self.state in FINISHED_STATES


@dataclass(frozen=True)
class StartEstimate:
    """One line of ``squeue --start``: when and where the scheduler expects a job to start."""

    job_id: int
    start_time: float | None
    planned_nodes: tuple[str, ...]


@dataclass(frozen=True)
class NodeInfo:
    """A compute node and how to reach it.  ``state`` is upper case, flags joined by '+'."""

    name: str
    addr: str
    hostname: str
    state: str
    cpus: int


@dataclass(frozen=True)
class QueueSnapshot:
    """Every job slurmctld reported at one moment.

    ``planned_nodes_known`` is False when the source cannot tell planned nodes (22.05's JSON):
    an empty ``planned_nodes`` then means "unknown", not "no plan".
    """

    taken_at: float
    slurm_version: str
    jobs: tuple[JobInfo, ...]
    planned_nodes_known: bool = False

    def job(self, job_id: int) -> JobInfo | None:
        """The job with this id, or None if it is not in the snapshot."""
        return next((job for job in self.jobs if job.job_id == job_id), None)

"""The watcher: fold one Slurm queue snapshot into the daemon's job table.

Pure helpers decide what changed; ``sync`` applies it inside one database transaction.
A job that leaves ``squeue`` without our seeing its end state (the daemon was down longer
than MinJobAge) is recorded as ended, so its leases still expire.

A Slurm job id names one job at a time only: Slurm gives it again when its counter wraps or its
state is reset. A job is its id and its submit time (``same_job``); a newer job with a known id
ends the older one's row at once (no lease grace: nothing can requeue it) and is admitted once
the older one's job directories are released, since they are named by the id on the nodes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from hpcstage.core import directives as dirs
from hpcstage.db import Event, Job, Request
from hpcstage.errors import DirectiveError
from hpcstage.watch.slurm.model import FINISHED_STATES, JobInfo, QueueSnapshot

log = logging.getLogger("hpcstage.daemon")

# Slurm's final states, plus the two flags it shows instead of one for requeued/federated jobs.
ENDED_STATES = FINISHED_STATES | {"SPECIAL_EXIT", "REVOKED"}
# How far slurmctld's clock (submit times) and the daemon's (first_seen) may disagree.
CLOCK_SLACK = 600.0
# What our row of a run says once Slurm requeued it while it ran (see requeued_while_open).
REQUEUED_RUN = "REQUEUED"
# New rows flushed at once (a first tick admits the whole queue: see sync).
FLUSH_EVERY = 500
# New jobs one sync admits at most. Admitting a job (reading, parsing, authorizing and
# auditing its directives) costs about a millisecond of the event loop, so a daemon started
# beside a queue of 12,000 jobs would answer nobody for 12 s; in slices, the API and the
# agents' sessions are served between them and the soonest jobs are staged first.
ADMIT_PER_SYNC = 1000
# One Slurm job, even where ids are reused: its id and its submit time.
JobKey = tuple[int, float | None]


@dataclass(frozen=True)
class Directives:
    """What the daemon learned about one job's directives."""

    source: str  # admin_comment | batch_script | none
    stage_in: list[dict[str, object]]  # {src, dest, line, text, source: {...}}
    stage_out: list[dict[str, object]]
    error: str = ""

    @property
    def any(self) -> bool:
        return bool(self.stage_in or self.stage_out or self.error)


DirectivesFn = Callable[[JobInfo], Awaitable[Directives]]


def is_ended(info: JobInfo) -> bool:
    """True when Slurm reports the job finished (any end state)."""
    return info.state in ENDED_STATES


def job_key(info: JobInfo) -> JobKey:
    """What tells ``info`` from another job Slurm gave the same id."""
    return (info.job_id, info.submit_time)


def same_job(row: Job, info: JobInfo) -> bool:
    """True if ``row`` records the Slurm job ``info`` (whose id it has), False if ``info`` is
    a newer job that Slurm gave the same id.

    A job never changes owner (where both names are known). Slurm gives a requeued job a new
    submit time and counts the restart, so only a new submit time without a restart names
    another job. A row from a release that kept no submit time compares with when the daemon
    first saw it: a job submitted later than that (beyond ``CLOCK_SLACK``) cannot be its job.
    """
    if row.user and info.user and row.user != info.user[:64]:
        return False
    if info.submit_time is None or info.restarts > 0:
        return True
    if row.submitted_at is None:
        return info.submit_time <= row.first_seen + CLOCK_SLACK
    return abs(info.submit_time - row.submitted_at) < 1.0


@dataclass
class Folded:
    """What the last committed ``sync`` folded: per Slurm id, our row's id and the JobInfo.

    A queue of thousands of jobs changes in few of them between two snapshots, and folding an
    unchanged record into its row changes nothing (every column it sets comes from the record,
    and no other code writes them). So a job whose record equals the one folded into the same
    open row is skipped without loading the row. Only what a committed transaction folded
    counts: ``sync`` fills ``pending``, the caller calls ``commit()`` once its transaction
    committed (a rolled-back one leaves the rows as they were, and the next sync redoes them).
    """

    rows: dict[int, tuple[int, JobInfo]] = field(default_factory=dict)
    pending: dict[int, tuple[int, JobInfo]] = field(default_factory=dict)
    deferred: int = 0  # new jobs the last sync left for the next (beyond ADMIT_PER_SYNC)

    def unchanged(self, row_id: int | None, info: JobInfo) -> bool:
        """True if ``info`` is what was folded into the open row ``row_id`` last time."""
        return row_id is not None and self.rows.get(info.job_id) == (row_id, info)

    def commit(self) -> None:
        """The transaction of the last ``sync`` committed: its records are the rows' now."""
        self.rows, self.pending = self.pending, {}


async def sync(
    session: Session,
    snapshot: QueueSnapshot,
    directives_for: DirectivesFn,
    ignored: set[JobKey],
    folded: Folded | None = None,
    admit_limit: int | None = None,
) -> list[int]:
    """Record new jobs with directives, update known ones, mark vanished or replaced ones
    ended.

    ``ignored`` caches jobs without directives so their scripts are read only once;
    ``folded`` (kept by the caller across ticks) lets unchanged jobs be skipped.
    At most ``admit_limit`` (default ``ADMIT_PER_SYNC``) new jobs are admitted, the soonest
    to need their data first (``admission_order``); ``folded.deferred`` counts the others,
    which the next sync of this snapshot or a later one admits (the caller syncs again soon
    while any are left).
    Returns the ids (our ``jobs.id``) of jobs that changed state.
    """
    folded = folded if folded is not None else Folded()
    open_rows: dict[int, int] = {
        slurm_id: row_id
        for row_id, slurm_id in session.execute(
            select(Job.id, Job.slurm_job_id).where(Job.kind == "job", Job.ended_at.is_(None))
        )
        if slurm_id is not None
    }
    todo = [i for i in snapshot.jobs if not folded.unchanged(open_rows.get(i.job_id), i)]
    in_snapshot = {info.job_id for info in snapshot.jobs}
    wanted = [open_rows[i.job_id] for i in todo if i.job_id in open_rows]
    wanted += [row_id for slurm_id, row_id in open_rows.items() if slurm_id not in in_snapshot]
    wanted.sort()  # rows in id order, as the query of every open row gave them
    known = {job.slurm_job_id: job for job in _load(session, wanted) if job.slurm_job_id}
    folded.pending = {
        i.job_id: (open_rows[i.job_id], i)
        for i in snapshot.jobs
        if i.job_id in open_rows and folded.unchanged(open_rows[i.job_id], i)
    }
    new = [i for i in todo if i.job_id not in known and _admissible(i, ignored)]
    # Rows an admission must know of: ended ones that had the id (few: jobs are admitted once).
    prior = _by_slurm_id(session, [i.job_id for i in new])
    # Only admissions that read directives count towards the slice: a job whose ended row
    # says it was handled (it left the queue in a glitch and came back) costs nothing, and
    # a slice full of those would keep every new job out.
    costly = [i for i in new if _reads_directives(prior.get(i.job_id), i)]
    limit = ADMIT_PER_SYNC if admit_limit is None else admit_limit
    later = {job_key(i) for i in sorted(costly, key=admission_order)[limit:]}
    folded.deferred = len(later)
    prior.update(known)
    changed: list[Job] = []
    admitted: list[tuple[JobInfo, Job]] = []  # open rows, to remember once flushed
    taken: set[int] = set()  # Slurm ids admitted by this sync
    ids: list[int] = []
    for info in todo:
        job = known.get(info.job_id)
        if job is not None and not same_job(job, info):
            _replaced(session, job, snapshot.taken_at)
            changed.append(job)
            job = None
        elif job is not None and requeued_while_open(job, info):
            _interrupted(session, job, snapshot.taken_at)
            changed.append(job)
            job = None
        if job is None and _admissible(info, ignored) and job_key(info) not in later:
            if info.job_id not in taken:
                old = prior.get(info.job_id)
                job = await _admit(session, info, old, directives_for, ignored, snapshot.taken_at)
            taken.update([info.job_id] if job is not None else [])
        if job is not None and _update(job, info, snapshot.taken_at):
            changed.append(job)
        if job is not None and job.ended_at is None:
            admitted.append((info, job))
        if len(taken) % FLUSH_EVERY == 0 and job is not None and job.id is None:
            ids += _settle(session, folded, changed, admitted)
    for slurm_id, job in known.items():
        if slurm_id not in in_snapshot:
            _vanished(session, job, snapshot.taken_at)
            changed.append(job)
    return ids + _settle(session, folded, changed, admitted)


def _admissible(info: JobInfo, ignored: set[JobKey]) -> bool:
    """A job with no open row that may need admitting: not known to have no directives,
    not ended."""
    return job_key(info) not in ignored and not is_ended(info)


def _reads_directives(old: Job | None, info: JobInfo) -> bool:
    """Whether admitting ``info`` reads its directives (see ``_admit``), given ``old``, the
    ended row that has its id, if any."""
    if old is None:
        return True
    if same_job(old, info) and not requeued_after_end(old, info):
        return False  # ended earlier and already handled
    return old.released_at is not None  # else it waits for the old run's directories


def admission_order(info: JobInfo) -> tuple[int, float, int, int]:
    """Which new jobs are admitted first when there are more than one sync admits: running
    ones (they need their directory now), then pending ones by the start Slurm expects
    (unknown last), then by priority, highest first."""
    start = info.start_time if info.start_time is not None else float("inf")
    return (1 if info.pending else 0, start, -info.priority, info.job_id)


def _settle(
    session: Session, folded: Folded, changed: list[Job], admitted: list[tuple[JobInfo, Job]]
) -> list[int]:
    """Flush (new rows get their ids), remember the open rows folded; the ids of the changed
    ones. Both lists are emptied: flushed rows need not stay in memory (the session holds
    them weakly), which bounds what admitting a whole queue at start-up holds at once."""
    session.flush()
    folded.pending.update((info.job_id, (job.id, info)) for info, job in admitted)
    found = [job.id for job in changed]
    changed.clear()
    admitted.clear()
    return found


def _load(session: Session, row_ids: list[int], chunk: int = 500) -> list[Job]:
    """The rows with these ids, in bounded queries (SQLite limits a query's parameters)."""
    found: list[Job] = []
    for start in range(0, len(row_ids), chunk):
        part = row_ids[start : start + chunk]
        found += session.scalars(select(Job).where(Job.id.in_(part)).order_by(Job.id))
    return found


def _by_slurm_id(session: Session, slurm_ids: list[int], chunk: int = 500) -> dict[int, Job]:
    """The rows that have these Slurm ids (at most one each: the column is unique)."""
    found: dict[int, Job] = {}
    for start in range(0, len(slurm_ids), chunk):
        part = slurm_ids[start : start + chunk]
        for job in session.scalars(select(Job).where(Job.slurm_job_id.in_(part))):
            found[int(job.slurm_job_id or 0)] = job
    return found


async def _admit(
    session: Session,
    info: JobInfo,
    old: Job | None,
    directives_for: DirectivesFn,
    ignored: set[JobKey],
    now: float,
) -> Job | None:
    """A new row for ``info`` if it has directives; ``old``: the row that has its id, if any."""
    if old is not None:
        rerun = requeued_after_end(old, info)
        if same_job(old, info) and not rerun:
            return None  # ended earlier and already handled
        _replaced(session, old, now, rerun)
        if old.released_at is None:
            return None  # its job directories on the nodes still have this id as their name
    found = await directives_for(info)
    if not found.any:
        ignored.add(job_key(info))
        return None
    if old is not None:  # released: the id is the new job's now (what the API looks up)
        old.former_slurm_job_id, old.slurm_job_id = old.slurm_job_id, None
        session.flush()
    # Column limits: slurmctld accepts longer names than PostgreSQL would store.
    job = Job(
        kind="job",
        slurm_job_id=info.job_id,
        name=info.name[:256],
        user=info.user[:64],
        account=info.account[:64],
        partition=info.partition[:64],
        state=info.state,
        directive_source=found.source,
        error=found.error,
        first_seen=now,
        submitted_at=info.submit_time,
        restarts=info.restarts,
    )
    job.requests = [_request("in", i, d) for i, d in enumerate(found.stage_in)]
    job.requests += [_request("out", i, d) for i, d in enumerate(found.stage_out)]
    if found.stage_out and not found.stage_in and not found.error:
        # Nothing to stage in, but the job needs its directory to write outputs into.
        job.requests.append(
            Request(
                direction="dir", position=0, src="", dest=".", text="(job directory for stage-out)"
            )
        )
    session.add(job)
    msg = f"directives from {found.source}: {len(found.stage_in)} stage-in, "
    msg += f"{len(found.stage_out)} stage-out"
    # The event names the row, not its id: the rows are flushed together, once (sync).
    message = msg + (f"; refused: {found.error}" if found.error else "")
    level = "error" if found.error else "info"
    session.add(Event(ts=time.time(), job=job, node="", level=level, message=message))
    return job


def _request(direction: str, position: int, d: dict[str, object]) -> Request:
    return Request(
        direction=direction,
        position=position,
        src=str(d["src"]),
        dest=str(d["dest"]),
        line=int(str(d.get("line", 0))),
        text=str(d.get("text", "")),
        when=str(d.get("when", "always")),
        optional=bool(d.get("optional", False)),
        pack=bool(d.get("pack", False)),
        dest_template=str(d.get("template", "")),
    )


def _update(job: Job, info: JobInfo, now: float) -> bool:
    before = (job.state, job.nodes, job.planned_nodes)
    job.state, job.priority = info.state[:32], info.priority
    job.state_reason = info.state_reason[:128]
    job.expected_start = info.start_time if info.state == "PENDING" else job.expected_start
    job.planned_nodes = ",".join(info.planned_nodes)
    if info.nodes:
        job.nodes = ",".join(info.nodes)
    if info.batch_host:
        job.batch_host = info.batch_host
    if info.state != "PENDING" and job.started_at is None and info.start_time:
        job.started_at = info.start_time
    if is_ended(info):
        job.ended_at = info.end_time or now
    # A requeue gives the job a new submit time: the next comparison is with that one.
    job.submitted_at = info.submit_time or job.submitted_at
    job.restarts = info.restarts
    # A pending array's record becomes its last task when that one starts.
    became_task = job.array_task_id != info.array_task_id and info.array_task_id is not None
    job.array_job_id, job.array_task_id = info.array_job_id, info.array_task_id
    job.array_tasks = info.array_tasks[:256]
    if became_task:
        _expand_outputs_again(job)
    return (job.state, job.nodes, job.planned_nodes) != before


def _expand_outputs_again(job: Job) -> None:
    """Expand the job's stage-out destinations again, now that its array task id is known.

    Admission saw the array's pending record, whose task id is none yet (%a gave sbatch's
    4294967294). Only outputs not yet staged out are touched.
    """
    context = dirs.JobContext(
        job_id=job.slurm_job_id or 0,
        user=job.user,
        name=job.name,
        array_job_id=job.array_job_id,
        array_task_id=job.array_task_id,
    )
    for request in job.requests:
        if request.direction != "out" or not request.dest_template or request.stagings:
            continue
        try:
            request.dest = dirs.expand_dest_template(request.dest_template, request.pack, context)
        except DirectiveError as exc:  # it expanded at admission: a bug if it does not now
            log.error("job %s: %s: cannot expand again: %s", job.slurm_job_id, request.text, exc)


def _vanished(session: Session, job: Job, now: float) -> None:
    job.ended_at = now
    if job.state not in ENDED_STATES:
        job.state = "GONE"
    log_event(session, job.id, "", "job left the Slurm queue; treating it as ended", "warning")


def requeued_after_end(row: Job, info: JobInfo) -> bool:
    """Whether Slurm runs the job of ``row`` again after the daemon saw it end (``scontrol
    requeue`` of a finished job, a requeue after a node failure seen as an end): a requeue
    counts a restart and gives a new submit time. The re-run is recorded as a run of its own,
    once this run's directories are released: staged again, and its outputs written back.
    Submit times are whole seconds, and Slurm makes a requeued job's at least one later
    (a job requeued within a second of its submission gets exactly one more)."""
    return (
        row.ended_at is not None
        and not is_ended(info)
        and info.restarts > 0
        and info.submit_time is not None
        and row.submitted_at is not None
        and info.submit_time >= row.submitted_at + 1.0
    )


def requeued_while_open(row: Job, info: JobInfo) -> bool:
    """Whether Slurm requeued the job of the open ``row`` before the daemon saw it end
    (``scontrol requeue`` of a running job, a node failure). Slurm counts the restart at
    once and gives the new submit time only once the run is wound down (its processes
    killed, COMPLETING over), and the re-run may start a second later: so a restart count
    above the row's is the sign; a row of an older release, which kept no count, goes by
    the new submit time (as ``requeued_after_end``). The run in the row never ended, so it is
    wound up as ``interrupted``, and the re-run is admitted as a run of its own
    (``_admit``, once the new submit time shows)."""
    if row.ended_at is not None:
        return False
    if row.restarts is not None:
        return info.restarts > row.restarts
    return (
        info.restarts > 0
        and info.submit_time is not None
        and row.submitted_at is not None
        and info.submit_time >= row.submitted_at + 1.0
    )


def interrupted(state: str, replaced_at: float | None) -> bool:
    """Whether a row is a run Slurm requeued while it ran (``_interrupted``): its outputs are
    partial, and the re-run writes the job's outputs, so this run's are not written back."""
    return state == REQUEUED_RUN and replaced_at is not None


def _interrupted(session: Session, job: Job, now: float) -> None:
    """End the row of a run Slurm requeued while it ran. Its job directories are released at
    once (``replaced``, no lease grace), outputs and all: the re-run gets fresh ones, named by
    the same id, and finds nothing of this run in them."""
    job.state, job.ended_at, job.replaced_at = REQUEUED_RUN, now, now
    message = f"Slurm requeued job {job.slurm_job_id} while it ran: this run's outputs are"
    message += " not written back (the re-run writes them), its job directories are released"
    message += " at once, and the re-run is staged anew"
    log_event(session, job.id, "", message, "warning")


def _replaced(session: Session, job: Job, now: float, rerun: bool = False) -> None:
    """Slurm gave ``job``'s id to a newer job (or ran it again, ``rerun``): ``job`` is gone
    for good (once recorded)."""
    if job.replaced_at is not None:
        return
    job.replaced_at = now
    if job.ended_at is None:
        _vanished(session, job, now)
    message = f"Slurm job id {job.slurm_job_id} now names a newer job: this one is over"
    if rerun:
        message = f"Slurm requeued job {job.slurm_job_id} after it ended: the re-run is staged anew"
    if job.released_at is None:
        message += "; its job directories are released without the lease grace"
    log_event(session, job.id, "", message, "warning")


def log_event(
    session: Session, job_id: int | None, node: str, message: str, level: str = "info"
) -> None:
    """Append one event to the log shown by ``hpcstage status``."""
    session.add(Event(ts=time.time(), job_id=job_id, node=node, level=level, message=message))


def split_nodes(text: str) -> tuple[str, ...]:
    """Comma-separated node names as stored in the database."""
    return tuple(n for n in text.split(",") if n)

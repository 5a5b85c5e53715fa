"""What staging attempts write to the state database: progress, per-file outcomes, endings.

``StagingRecords`` holds the progress agents report between ticks (and the per-file outcomes
of stage-outs) and writes them, with the staging's new state, when an attempt ends. The
helpers below it find or create the rows an attempt works on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.core import plan as planner
from hpcstage.core import stageout
from hpcstage.core.rules import Progress, columns
from hpcstage.db import Job, Request, Staging, Upload
from hpcstage.protocol.messages import FileOutcome
from hpcstage.staging.meters import Meters
from hpcstage.watch.fold import log_event, split_nodes

log = logging.getLogger("hpcstage.daemon")  # the daemon's log: the name sites filter on

MAX_INTERNAL_ERROR_ATTEMPTS = 5  # an unexpected error (a bug) ends a staging at this attempt


@dataclass
class StagingRecords:
    """The progress of running stagings, kept in memory between ticks and written to ``db``."""

    db: sessionmaker[Session]
    progress: dict[int, Progress] = field(default_factory=dict)
    # staging id -> path -> the agent's last report on that file (stage-out)
    files: dict[int, dict[str, FileOutcome]] = field(default_factory=dict)
    meters: Meters = field(default_factory=Meters)
    # staging id -> the Progress object (one per attempt) and the columns last written from it
    written: dict[int, tuple[Progress, dict[str, int]]] = field(default_factory=dict)

    def finish(self, staging_id: int, progress: Progress, written: str = "") -> None:
        """The staging is done: ready, with its final counters (``written``: the packed
        dataset version a packed stage-out made, named in the event)."""
        with self.db.begin() as session:
            st = session.get_one(Staging, staging_id)
            apply(st, progress)
            self.save_files(session, st)
            st.state, st.finished_at, st.attempts = "ready", time.time(), 0
            r = st.request
            what = f"{st.files_done} files, {st.bytes_done} bytes"
            if r.direction == "out":
                msg = f"stage-out verified: {r.src} -> {r.dest} ({what}, {st.fetched_files} sent)"
                msg += f"; packed as {written}" if written else ""
            else:
                msg = f"ready: {r.src} -> {r.dest} ({what}, {st.fetched_files} fetched)"
            log_event(session, r.job_id, st.node, msg)
            self.meters.attempt_ended(r.direction, "ready")
            if r.direction != "out" and inputs_ready(session, r.job_id):
                job = r.job
                self.meters.job_ready(job.id, job.kind, job.submitted_at or job.first_seen)
            if r.direction != "out" and ready_where_running(session, r.job_id):
                self.meters.wait_over(r.job_id)
        self.progress.pop(staging_id, None)

    def fail(
        self,
        staging_id: int,
        action: planner.Stage | planner.StageOut,
        message: str,
        node_only: bool = False,
    ) -> None:
        """The staging failed for good; the others running for the job on the node stop.

        ``node_only``: the node is at fault, not the data (its disk, cache or quota). A job
        that does not run on that node yet then only loses the node (``dropped``): the plan
        moves on, and Slurm may start the job elsewhere. Where the job runs, and for a
        warmup (whose nodes the user named), the failure is the job's.
        """
        with self.db.begin() as session:
            st = session.get_one(Staging, staging_id)
            job = st.request.job
            dropped = node_only and droppable(job, action.node)
            state = "dropped" if dropped else "failed"
            apply(st, self.progress.pop(staging_id, Progress()))
            self.save_files(session, st)
            st.state, st.error, st.finished_at = state, message, time.time()
            self.meters.attempt_ended(st.request.direction, state)
            # The other requests of this job on this node will not run now: say why.
            for other in job_stagings(session, action.job_id, action.node):
                if other.state == "running":
                    other.state, other.error = state, "not staged: another input failed"
                    self.meters.attempt_ended(other.request.direction, state)
            if dropped:
                text = (
                    f"{action.node} dropped from the job's nodes: {message} (the job can"
                    " still start elsewhere; it is staged again if Slurm starts it here)"
                )
                log_event(session, action.job_id, action.node, text, "warning")
            else:
                log_event(session, action.job_id, action.node, f"failed: {message}", "error")
        if not dropped:
            self.meters.job_failed(action.job_id)

    def restage(self, job_id: int, node: str, reason: str) -> None:
        """The job's ready inputs on ``node`` are queued again (the node powered down since:
        its view may be gone); the planner stages them once the node is up."""
        with self.db.begin() as session:
            found = [
                st
                for st in job_stagings(session, job_id, node)
                if st.request.direction != "out" and st.state == "ready"
            ]
            for st in found:
                st.state, st.attempts = "queued", 0
            if found:
                log_event(session, job_id, node, reason)

    def staged(self, staging_id: int) -> tuple[int, int]:
        """(bytes, files) a finished staging moved."""
        with self.db.begin() as session:
            st = session.get_one(Staging, staging_id)
            return st.bytes_done, st.files_done

    def save_files(self, session: Session, st: Staging) -> None:
        """Record per-file outcomes reported by the agent (insert or update by path)."""
        files = self.files.pop(st.id, {})
        if not files:
            return
        known = {u.path: u for u in st.uploads}
        for path, f in ((stageout.shown(p), f) for p, f in files.items()):
            row = known.get(path) or Upload(staging_id=st.id, path=path)
            row.key, row.size, row.state = stageout.shown(f.key), f.size, f.state
            row.trash_key, row.error = stageout.shown(f.trash_key), stageout.shown(f.error)
            row.updated_at = time.time()
            if path not in known:
                session.add(row)

    def recover(self, job_id: int, node: str, message: str) -> None:
        """An action on ``node`` for the job ended by an unexpected error: its running
        stagings are queued again, or failed once they have had enough attempts."""
        message = stageout.shown(message)  # an error may quote a file name that is not UTF-8
        with self.db.begin() as session:
            outcome = "will retry"
            for st in job_stagings(session, job_id, node):
                if st.state == "running":
                    # A bug that strikes every attempt must not keep a staging running forever.
                    give_up = st.attempts >= MAX_INTERNAL_ERROR_ATTEMPTS
                    st.state = "failed" if give_up else "queued"
                    self.meters.attempt_ended(
                        st.request.direction, "failed" if give_up else "requeued"
                    )
                    if give_up:
                        outcome = f"gave up after {st.attempts} attempts"
                    st.error = f"{outcome}: {message}" if give_up else message
                    self.progress.pop(st.id, None)
                    self.files.pop(st.id, None)
            log_event(session, job_id, node, f"{outcome}: {message}", "error")

    def live(self) -> dict[int, dict[str, int]]:
        """Per running staging id, the counters its agent reported since the last flush."""
        return {staging_id: columns(p) for staging_id, p in self.progress.items()}

    def flush(self, requeue: bool = False) -> None:
        """Write the latest counters; ``requeue``: running stagings go back to queued.

        Only counters that changed since this attempt's last write are written (an agent
        waiting on a large object reports nothing new for many ticks), in bulk queries."""
        due = {
            staging_id: (progress, columns(progress))
            for staging_id, progress in self.progress.items()
            if requeue or _changed(self.written.get(staging_id), progress)
        }
        if not due:
            return
        with self.db.begin() as session:
            for st in _stagings(session, list(due)):
                for name, value in due[st.id][1].items():
                    setattr(st, name, value)
                if requeue and st.state == "running":
                    st.state = "queued"
        self.written = {k: v for k, v in {**self.written, **due}.items() if k in self.progress}


def _changed(written: tuple[Progress, dict[str, int]] | None, progress: Progress) -> bool:
    """Whether ``progress`` has counters its attempt has not written yet."""
    return written is None or written[0] is not progress or written[1] != columns(progress)


def _stagings(session: Session, ids: list[int], chunk: int = 500) -> list[Staging]:
    """The stagings with these ids, in bounded queries (SQLite limits a query's parameters)."""
    found: list[Staging] = []
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        found += session.scalars(select(Staging).where(Staging.id.in_(part)).order_by(Staging.id))
    return found


def requeue_running(db: sessionmaker[Session]) -> None:
    """At start-up: transfers that were running when the daemon stopped are queued again."""
    with db.begin() as session:
        session.execute(update(Staging).where(Staging.state == "running").values(state="queued"))


def key_of(job: Job) -> str:
    """How agents name a job: its Slurm id, or ``warmup-<id>`` (``pin-<id>``)."""
    return str(job.slurm_id) if job.kind == "job" else f"{job.kind}-{job.id}"


def staging_row(session: Session, request: Request, node: str) -> Staging:
    """The staging of ``request`` on ``node``, created queued if there is none yet."""
    found = session.scalar(
        select(Staging).where(Staging.request_id == request.id, Staging.node == node)
    )
    if found is None:
        found = Staging(request_id=request.id, node=node, state="queued")
        session.add(found)
        session.flush()
    return found


def droppable(job: Job, node: str) -> bool:
    """Whether a node-only failure on ``node`` may just drop the node from ``job``'s targets:
    a batch job that does not run there (yet)."""
    if job.kind != "job":
        return False
    running_here = job.state in planner.RUNNING_JOB_STATES and node in job.nodes.split(",")
    return not running_here


def inputs_ready(session: Session, job_id: int) -> bool:
    """Whether every stage-in of the job is ready on every node it is (still) meant for."""
    states = session.scalars(
        select(Staging.state)
        .join(Request)
        .where(
            Request.job_id == job_id,
            Request.direction != "out",
            Staging.state.notin_(("released", "dropped")),
        )
    ).all()
    return bool(states) and all(s == "ready" for s in states)


def ready_where_running(session: Session, job_id: int) -> bool:
    """Whether the daemon has seen the job run, and every stage-in of it is ready on each
    node it runs on (what a job waits for at its start)."""
    job = session.get(Job, job_id)
    nodes = split_nodes(job.nodes) if job is not None else ()
    if not nodes:
        return False
    inputs = (Request.job_id == job_id, Request.direction != "out")
    wanted = session.scalar(select(func.count()).select_from(Request).where(*inputs)) or 0
    ready = session.scalar(
        select(func.count())
        .select_from(Staging)
        .join(Request)
        .where(*inputs, Staging.node.in_(nodes), Staging.state == "ready")
    )
    return wanted > 0 and ready == wanted * len(nodes)


def job_stagings(session: Session, job_id: int, node: str) -> list[Staging]:
    """Every staging of the job on ``node``."""
    query = select(Staging).join(Request).where(Request.job_id == job_id, Staging.node == node)
    return list(session.scalars(query))


def apply(st: Staging, progress: Progress) -> None:
    """Set the staging's counters from ``progress``."""
    for name, value in columns(progress).items():
        setattr(st, name, value)

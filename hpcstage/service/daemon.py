"""The site daemon: watch Slurm, plan, and have node agents stage; serve the API.

Lifecycle (as uvicorn's server): startup -> main loop -> shutdown. SIGTERM/SIGINT drain:
no new transfers start, running ones are cancelled and left ``queued`` in the database, so a
restarted daemon resumes them (the agents' caches keep every object already verified).
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.agent import peer
from hpcstage.config.settings import Settings
from hpcstage.core import directives as dirs
from hpcstage.core import limits, policy, quota, stageout
from hpcstage.core import plan as planner
from hpcstage.core.nodes import cache_dir_for, expand_node_template
from hpcstage.core.units import format_size
from hpcstage.db import Job, Request, Staging, Upload, open_db
from hpcstage.db.changes import Changes
from hpcstage.errors import (
    CredentialError,
    DirectiveError,
    HpcstageError,
    LimitError,
    SlurmError,
    StoreError,
    TransportError,
)
from hpcstage.protocol.framing import AgentError, RpcClient
from hpcstage.service import leader
from hpcstage.service.audit import AuditLog
from hpcstage.staging import trash
from hpcstage.staging.pool import (
    AgentPool,
    AgentSession,
    SshTarget,
    agent_argv,
    agent_command,
    agent_shell_command,
    open_local,
    open_ssh,
)
from hpcstage.store.clients import ClientCache
from hpcstage.store.credentials import CredentialSource
from hpcstage.store.protocol import parse_s3_url
from hpcstage.store.s3 import S3Store
from hpcstage.watch import tickview
from hpcstage.watch.fold import Directives, JobKey, log_event, sync
from hpcstage.watch.slurm.backend import CliBackend, SlurmBackend
from hpcstage.watch.slurm.model import JobInfo

log = logging.getLogger("hpcstage.service.daemon")

MAX_TRANSPORT_ATTEMPTS = 5
# After a node's agent dies or cannot be reached, wait before trying it again: 2 s, 4 s, ...
# up to a minute. Five attempts thus ride out about a minute of a node being unreachable.
NODE_BACKOFF_BASE = 2.0
NODE_BACKOFF_MAX = 60.0
TRASH_EXPIRY_EVERY = 3600.0  # seconds between recycle-bin sweeps
SNAPSHOT_REUSE = 2.0  # seconds an early tick may plan on the last queue snapshot
EVICT_EVERY = 30.0  # seconds between eviction passes on the nodes' caches
# Peer copies at once: their bytes cross the daemon host, which must not become the
# bottleneck of a job array starting on a hundred nodes (those beyond it fetch from the store).
PEER_COPIES = 2
MAX_STAGE_OUT_ATTEMPTS = 200  # a store down for hours still gets the outputs in the end
MAX_INTERNAL_ERROR_ATTEMPTS = 5  # an unexpected error (a bug) ends a staging at this attempt
# The daemon's own S3 clients kept open (one per bucket, each a connection pool): users name
# buckets in requests, so more than a few would grow with every name.
STORE_CLIENTS = 8


def reconnect_delay(failures: int) -> float:
    """Seconds to wait before trying a node again after ``failures`` (>= 1) in a row."""
    return float(min(NODE_BACKOFF_BASE * 2 ** min(failures - 1, 16), NODE_BACKOFF_MAX))


@dataclass
class Progress:
    """Latest progress of one staging: written to the database at each tick, shown live by the
    API in between (``Daemon.live_progress``)."""

    files_done: int = 0
    bytes_done: int = 0
    files_total: int | None = None
    bytes_total: int | None = None
    fetched: int = 0


@dataclass
class Daemon:
    """One site daemon. ``run()`` until stopped; ``tick()`` is one watch-plan-act round."""

    settings: Settings
    backend: SlurmBackend | None = None
    db: sessionmaker[Session] | None = None
    _pool: AgentPool | None = None
    _agent_command: str = ""  # set with _pool: nodes.agent_command, or our own hpcstage's
    _tasks: dict[tuple[int, str], asyncio.Task[None]] = field(default_factory=dict)
    _progress: dict[int, Progress] = field(default_factory=dict)
    _files: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    _ignored: set[JobKey] = field(default_factory=set)
    _node_addr: dict[str, str] = field(default_factory=dict)
    # node -> (consecutive transport failures, time before which it is not tried again)
    _node_down: dict[str, tuple[int, float]] = field(default_factory=dict)
    _peer_copies: int = 0  # running now (at most PEER_COPIES)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    changes: Changes = field(default_factory=Changes)  # committed writes, for long polling
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _credentials: dict[str, str] | None = None
    _creds: CredentialSource | None = None  # where _credentials come from, asked each tick
    _region: str = "us-east-1"  # store.region, else the AWS environment's, resolved at start-up
    _stores: ClientCache[S3Store] = field(init=False)
    _last_expiry: float = 0.0
    _last_eviction: float = 0.0
    _snapshot_at: float = -math.inf  # time.monotonic() of the last queue snapshot
    _want_fresh: bool = False
    _lock: leader.StateLock | None = None
    exit_code: int = 0  # of `hpcstage daemon`: 3 when the state's lock was lost
    audit: AuditLog = field(init=False)
    last_tick: float = 0.0
    last_error: str = ""

    # ------------------------------------------------------------------ lifecycle

    def __post_init__(self) -> None:
        self.audit = AuditLog(Path(self.settings.site.state_dir) / "audit.jsonl")
        self._stores = ClientCache(STORE_CLIENTS, self._new_store)

    async def startup(self) -> None:
        """Open state, resume interrupted work, prepare the Slurm backend and agents."""
        if self.db is None:
            self.db = open_db(self.settings.site.state_url)
        self.changes.watch(self.db)
        self.changes.bind(asyncio.get_running_loop())
        if self.backend is None:
            bin_dir = str(self.settings.slurm.bin_dir or "")
            self.backend = CliBackend(bin_dir=bin_dir)
        self._creds = CredentialSource(self.settings.store.profile or None)
        self._credentials = self._creds.current()
        self._region = self._creds.region(self.settings.store.region)
        self._pool = AgentPool(self._open_agent, self._hello)
        self._agent_command = agent_command(self.settings.nodes.agent_command)
        log.info("agents start with: %s", self._agent_command)
        with self.db.begin() as session:
            # Transfers that were running when we stopped are simply queued again.
            session.execute(
                update(Staging).where(Staging.state == "running").values(state="queued")
            )
        await self._refresh_nodes()

    async def run(self, api: Any = None) -> None:
        """Run until SIGTERM/SIGINT; ``api`` is an optional coroutine serving HTTP.

        Only one daemon acts on a state database (leader.py): while another holds its lock,
        this one stands by, without serving the API, and takes over when that one is gone.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        self._lock = leader.state_lock(self.settings.site.state_url)
        api_task = watch_task = None
        try:
            if self._lock is not None and not await self._elect(self._lock):
                return  # stopped while standing by
            await self.startup()
            if self._lock is not None:
                watch_task = asyncio.create_task(self._watch_lock(self._lock))
            api_task = asyncio.create_task(api) if api is not None else None
            try:
                await self.main_loop()
            finally:
                for task in (api_task, watch_task):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await task
                await self.shutdown()
        finally:
            if api is not None and api_task is None:
                api.close()  # never started (standing by, or start-up failed)
            if self._lock is not None:
                self._lock.release()

    async def _elect(self, lock: leader.StateLock) -> bool:
        """Take the state's lock, standing by while another daemon holds it; False when
        stopped first. Errors reaching the state end the first attempt (a wrong URL fails
        at once) and are retried while standing by (the database may be restarting). Lock
        calls run in a thread: signals are handled while one waits on the network."""
        said = False
        first = True
        while not self._stopping.is_set():
            try:
                if await asyncio.to_thread(lock.try_acquire):
                    return await self._take_over(lock, after_another=said)
            except leader.StateUnavailable as exc:
                if first:
                    raise
                log.warning("standing by: %s; trying again", exc)
            else:
                if not said:
                    holder = await asyncio.to_thread(lock.holder)
                    log.warning(
                        "standing by: another hpcstage daemon is active on the %s%s;"
                        " this one takes over when it stops",
                        lock.where,
                        f" ({holder})" if holder else "",
                    )
                    said = True
            first = False
            await self._sleep_unless_stopped(leader.STANDBY_RETRY)
        return False

    async def _take_over(self, lock: leader.StateLock, after_another: bool) -> bool:
        if after_another and lock.takeover_grace > 0:
            # The one that was active may not know yet that it lost the lock (a database
            # restart drops every session): give it the time to notice and stop.
            log.warning(
                "taking over the %s: acting in %.0f s, once the daemon that was active has"
                " noticed it lost the lock",
                lock.where,
                lock.takeover_grace,
            )
            await self._sleep_unless_stopped(lock.takeover_grace)
            if self._stopping.is_set():
                return False
        log.info("active: this daemon holds the %s", lock.where)
        return True

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _watch_lock(self, lock: leader.StateLock) -> None:
        """Stop at once, with exit status 3, if the state's lock is lost (with the database
        session): another daemon may take over, and two must never act at once."""
        while not self._stopping.is_set():
            await self._sleep_unless_stopped(leader.CHECK_EVERY)
            if self._stopping.is_set() or await asyncio.to_thread(lock.still_held):
                continue
            log.critical("lost the lock on the %s: stopping, not to act twice", lock.where)
            self.exit_code = 3
            self.stop()

    def _on_signal(self) -> None:
        if self._stopping.is_set():
            log.warning("second signal: exiting now")
            raise SystemExit(1)
        log.info("signal received: draining (send again to exit at once)")
        self._stopping.set()
        self._wake.set()

    def stop(self) -> None:
        """Ask the main loop to drain and return."""
        self._stopping.set()
        self._wake.set()

    async def main_loop(self) -> None:
        """Tick every poll_interval, or at once when woken (API ensure, a finished transfer)."""
        interval = self.settings.slurm.poll_interval
        woken = False
        while not self._stopping.is_set():
            try:
                reuse, self._want_fresh = woken and not self._want_fresh, False
                await self.tick(reuse_snapshot=reuse)
                await self._renew_credentials()
                await self._maybe_evict()
                await self._maybe_expire()
            except (SlurmError, TransportError, StoreError) as exc:
                # Slurm or a node may be briefly unreachable: log and carry on.
                self.last_error = str(exc)
                log.error("tick failed: %s", exc)
            self._wake.clear()
            woken = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
                woken = True

    async def _renew_credentials(self) -> None:
        """Hand agents the store credentials anew when botocore has refreshed them (temporary
        ones are refreshed within 15 minutes of their expiry; long-term ones never change)."""
        if self._creds is None:
            return
        try:
            fresh = await asyncio.to_thread(self._creds.current)
        except CredentialError as exc:
            log.error("%s (staging goes on with the current ones until they expire)", exc)
            return
        if fresh == self._credentials:
            return
        self._credentials = fresh
        await self._stores.renew()
        assert self._pool is not None
        told = 0
        for node in self._pool.open_nodes():
            try:
                rpc = await self._pool.get(node)
                await asyncio.wait_for(rpc.call("credentials", {"credentials": fresh}), 30)
                told += 1
            except (HpcstageError, TimeoutError) as exc:  # it gets them in its next hello
                log.warning("agent on %s: new S3 credentials not handed over: %s", node, exc)
        log.info("S3 credentials renewed; handed to %d agent(s)", told)

    async def _maybe_expire(self) -> None:
        if time.time() - self._last_expiry < TRASH_EXPIRY_EVERY:
            return
        self._last_expiry = time.time()
        deleted = await self.expire_trash()
        if deleted:
            log.info("recycle bin: %d expired objects deleted", deleted)

    async def shutdown(self) -> None:
        """Cancel transfers (they stay queued in the database) and close agent sessions."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self.exit_code != 3:  # with the lock lost, the state is the next daemon's
            self._flush_progress(requeue=True)
        if self._pool is not None:
            await self._pool.close()
        await self._stores.close()

    def wake(self, fresh: bool = False) -> None:
        """Run a tick now; ``fresh``: with a new queue snapshot (a job asked for its inputs
        and must be seen running), else the last one may do if it is recent (a warmup)."""
        self._want_fresh = self._want_fresh or fresh
        self._wake.set()

    # ------------------------------------------------------------------ one round

    async def tick(self, reuse_snapshot: bool = False) -> None:
        """Snapshot the queue, fold it into the database, plan, and start actions.

        With ``reuse_snapshot`` (a tick that something woke early: an API request, a finished
        transfer) the queue is not asked again if it was less than ``SNAPSHOT_REUSE`` seconds
        ago: a warmup then starts without waiting for squeue, and Slurm's view is never older
        than that bound (a timed tick always takes a fresh snapshot).
        """
        assert self.backend is not None
        assert self.db is not None
        if not reuse_snapshot or time.monotonic() - self._snapshot_at >= SNAPSHOT_REUSE:
            snapshot = await self.backend.snapshot()
            self._snapshot_at = time.monotonic()
            with self.db.begin() as session:
                await sync(session, snapshot, self._directives, self._ignored)
        self._flush_progress()
        with self.db.begin() as session:
            views = list(self._views(session))
        inflight: dict[str, int] = {}
        for _, node in self._tasks:
            inflight[node] = inflight.get(node, 0) + 1
        actions = planner.plan(
            views,
            time.time(),
            self.settings.cache.lease_grace,
            inflight,
            cache_nodes=self.settings.cache.cluster_nodes,
        )
        for action in actions:
            self._act(action)
        self.last_tick = time.time()

    def _views(self, session: Session) -> Iterable[planner.JobView]:
        return tickview.read_views(session)  # plain columns: no ORM object per directive

    def _act(self, action: planner.Action) -> None:
        if isinstance(action, planner.MarkReleased):
            self._mark_released(action.job_id)
            return
        key = (action.job_id, action.node)
        if key in self._tasks or self._backing_off(action.node):
            return
        if isinstance(action, planner.Stage):
            coro = self._stage(action)
        elif isinstance(action, planner.StageOut):
            coro = self._stage_out(action)
        else:
            coro = self._release(action)
        task = asyncio.create_task(coro, name=f"{type(action).__name__}-{key}")
        self._tasks[key] = task
        task.add_done_callback(functools.partial(self._done, key))

    def _done(self, key: tuple[int, str], task: asyncio.Task[None]) -> None:
        self._tasks.pop(key, None)
        self._wake.set()  # a finished transfer may unblock the next one
        if task.cancelled() or task.exception() is None:
            return
        # A bug or an unexpected library error: never leave stagings 'running' for good.
        exc = task.exception()
        log.error("action on job %s node %s failed: %r", key[0], key[1], exc, exc_info=exc)
        self._recover(key[0], key[1], f"internal error: {type(exc).__name__}: {exc}")

    def _recover(self, job_id: int, node: str, message: str) -> None:
        assert self.db is not None
        message = stageout.shown(message)  # an error may quote a file name that is not UTF-8
        with self.db.begin() as session:
            outcome = "will retry"
            for st in _job_stagings(session, job_id, node):
                if st.state == "running":
                    # A bug that strikes every attempt must not keep a staging running forever.
                    give_up = st.attempts >= MAX_INTERNAL_ERROR_ATTEMPTS
                    st.state = "failed" if give_up else "queued"
                    if give_up:
                        outcome = f"gave up after {st.attempts} attempts"
                    st.error = f"{outcome}: {message}" if give_up else message
                    self._progress.pop(st.id, None)
                    self._files.pop(st.id, None)
            log_event(session, job_id, node, f"{outcome}: {message}", "error")

    # ------------------------------------------------------------------ actions

    async def _stage(self, action: planner.Stage) -> None:
        assert self.db is not None
        with self.db.begin() as session:
            job = session.get_one(Job, action.job_id)
            requests = [r for r in job.requests if r.direction in ("in", "dir")]
            # The agent's "stage" parameters but the items; a warmup only fills the cache.
            call = {"job": _job_key(job), "user": job.user, "view": job.kind != "warmup"}
            log_event(session, job.id, action.node, f"staging: {action.reason}")
            stagings = [_staging(session, r, action.node) for r in requests]
            for st in stagings:
                st.state, st.started_at, st.error = "running", time.time(), ""
                st.peer_files = 0  # counted per attempt, like fetched_files
                st.attempts += 1
            plan = [
                (st.id, r.id, r.src, r.dest, r.text, r.line)
                for st, r in zip(stagings, requests, strict=True)
            ]
        current = plan[0] if plan else None
        try:
            rpc = await self._agent(action.node)
            spent = objects = 0
            for current in plan:
                staging_id, request_id, src, dest, _text, _line = current
                limit = self._budget(action.job_id, action.node, spent)
                if src:
                    await self._peer_fill(rpc, action, staging_id, src, limit)
                left = limits.stage_in_budget(self.settings.limits, objects)
                await self._stage_one(rpc, staging_id, call, request_id, src, dest, limit, left)
                done_bytes, done_files = self._staged(staging_id)
                spent, objects = spent + done_bytes, objects + done_files
        except AgentError as exc:
            assert current is not None
            if exc.transient:  # the store was down or throttling: try again later
                self._requeue(action, _from(plan, current), str(exc))
            else:
                self._fail(current[0], action, f"{_where(current)}{exc}")
        except TransportError as exc:
            self._node_failed(action.node)
            self._requeue(action, _from(plan, current), str(exc))

    async def _peer_fill(
        self,
        rpc: RpcClient,
        action: planner.Stage,
        staging_id: int,
        src: str,
        limit: quota.Budget,
    ) -> None:
        """Copy the small objects of ``src`` another node's cache holds (transfer/peer.py),
        counted in the staging's ``peer_files``.

        Never fails the staging: whatever is not copied, the stage fetches from the store.
        """
        if not self.settings.transfer.peer_copy or self._peer_copies >= PEER_COPIES:
            return
        source = source_params(src)
        if source["kind"] not in ("s3-prefix", "s3-key"):
            return
        for other in self._peers_holding(src, action.node):
            self._peer_copies += 1
            try:
                copied = await peer.copy_from_peer(
                    rpc, await self._agent(other), source, limit.max_bytes
                )
            except (AgentError, TransportError, LookupError, TypeError, ValueError) as exc:
                log.warning("peer copy of %s from %s to %s: %s", src, other, action.node, exc)
                continue
            finally:
                self._peer_copies -= 1
            if copied.objects or copied.refused:
                message = (
                    f"copied {copied.objects} objects ({format_size(copied.bytes)}) of {src}"
                    f" from {other}'s cache"
                )
                if copied.refused:
                    message += f"; {copied.refused} failed verification (fetched from the store)"
                assert self.db is not None
                with self.db.begin() as session:
                    session.get_one(Staging, staging_id).peer_files += copied.objects
                    log_event(session, action.job_id, action.node, message)
            return

    def _peers_holding(self, src: str, node: str) -> list[str]:
        """Other nodes whose staging of ``src`` finished (their caches likely hold it).

        None when ``node`` itself staged ``src`` before: its cache likely holds it already,
        and asking a peer page by page what it lacks would cost more than the stage's own
        listing finding the few objects evicted since.
        """
        assert self.db is not None
        with self.db.begin() as session:
            found = set(
                session.scalars(
                    select(Staging.node)
                    .join(Request, Staging.request_id == Request.id)
                    .where(
                        Request.src == src,
                        Request.direction == "in",
                        Staging.state.in_(("ready", "released")),
                    )
                    .distinct()
                ).all()
            )
        if node in found:
            return []
        known = set(self._node_addr) | set(self.settings.cache.cluster_nodes)
        return [n for n in sorted(found) if n in known and not self._backing_off(n)]

    async def _stage_one(
        self,
        rpc: RpcClient,
        staging_id: int,
        call: dict[str, Any],
        request_id: int,
        src: str,
        dest: str,
        limit: quota.Budget,
        objects: limits.ObjectBudget,
    ) -> None:
        progress = self._progress.setdefault(staging_id, Progress())

        def on_progress(data: dict[str, Any]) -> None:
            _take(progress, data)

        items = []
        if src:  # a "dir" request (stage-out only job) just needs the job directory
            items.append(
                {
                    "request_id": request_id,
                    "source": source_params(src),
                    "dest": dest,
                    "max_bytes": limit.max_bytes,
                    "quota_reason": limit.reason,
                    "max_objects": objects.max_objects,
                    "objects_reason": objects.reason,
                }
            )
        result = await rpc.call("stage", {**call, "items": items}, on_progress)
        for got in result.get("items", []):
            on_progress(got)
        self._finish(staging_id, progress)

    def _budget(self, job_id: int, node: str, spent: int) -> quota.Budget:
        """How many more bytes the job may stage on ``node`` (quotas; leases of others count)."""
        assert self.db is not None
        with self.db.begin() as session:
            account = session.get_one(Job, job_id).account
            used = session.scalar(
                select(func.coalesce(func.sum(Staging.bytes_done), 0))
                .join(Request)
                .join(Job)
                .where(
                    Job.account == account,
                    Job.id != job_id,
                    Staging.node == node,
                    Request.direction == "in",
                    Staging.state.in_(("ready", "running")),
                )
            )
        return quota.budget(self.settings.quotas, account, node, spent, int(used or 0))

    def _staged(self, staging_id: int) -> tuple[int, int]:
        """(bytes, files) a finished staging moved."""
        assert self.db is not None
        with self.db.begin() as session:
            st = session.get_one(Staging, staging_id)
            return st.bytes_done, st.files_done

    def _finish(self, staging_id: int, progress: Progress) -> None:
        assert self.db is not None
        with self.db.begin() as session:
            st = session.get_one(Staging, staging_id)
            _apply(st, progress)
            self._save_files(session, st)
            st.state, st.finished_at, st.attempts = "ready", time.time(), 0
            r = st.request
            what = f"{st.files_done} files, {st.bytes_done} bytes"
            if r.direction == "out":
                msg = f"stage-out verified: {r.src} -> {r.dest} ({what}, {st.fetched_files} sent)"
            else:
                msg = f"ready: {r.src} -> {r.dest} ({what}, {st.fetched_files} fetched)"
            log_event(session, r.job_id, st.node, msg)
        self._progress.pop(staging_id, None)

    def _fail(
        self, staging_id: int, action: planner.Stage | planner.StageOut, message: str
    ) -> None:
        assert self.db is not None
        with self.db.begin() as session:
            st = session.get_one(Staging, staging_id)
            _apply(st, self._progress.pop(staging_id, Progress()))
            self._save_files(session, st)
            st.state, st.error, st.finished_at = "failed", message, time.time()
            # The other requests of this job on this node will not run now: say why.
            for other in _job_stagings(session, action.job_id, action.node):
                if other.state == "running":
                    other.state, other.error = "failed", "not staged: another input failed"
            log_event(session, action.job_id, action.node, f"failed: {message}", "error")

    def _requeue(self, action: planner.Stage, staging_ids: list[int], message: str) -> None:
        assert self.db is not None
        with self.db.begin() as session:
            for staging_id in staging_ids:
                st = session.get_one(Staging, staging_id)
                _apply(st, self._progress.pop(staging_id, Progress()))
                give_up = st.attempts >= MAX_TRANSPORT_ATTEMPTS
                st.state = "failed" if give_up else "queued"
                st.error = f"node {action.node} unreachable: {message}"
            log_event(session, action.job_id, action.node, f"will retry: {message}", "warning")

    async def _stage_out(self, action: planner.StageOut) -> None:
        """Have the batch host's agent upload the job's outputs, one directive at a time."""
        assert self.db is not None
        with self.db.begin() as session:
            job = session.get_one(Job, action.job_id)
            job_key, ended_at, items = _job_key(job), job.ended_at or time.time(), []
            who = {"user": job.user, "job_completed": job.state == "COMPLETED"}
            optional: dict[int, bool] = {}
            on_states = frozenset(self.settings.stage_out.on_states)
            for r in (r for r in job.requests if r.direction == "out"):
                st = _staging(session, r, action.node or "-")
                run, why = stageout.should_run(r.when, job.state, on_states)
                if not action.node:
                    run, why = False, "the job never ran on a node: no outputs"
                if not run:
                    st.state, st.error, st.finished_at = "skipped", why, time.time()
                    continue
                st.state, st.started_at, st.error = "running", time.time(), ""
                st.attempts += 1
                items.append((st.id, r.id, r.src, r.dest, r.text, r.line))
                optional[st.id] = r.optional
            log_event(session, job.id, action.node, f"stage-out of {len(items)} directive(s)")
        current = items[0] if items else None
        try:
            rpc = await self._agent(action.node) if items else None
            files = size = 0
            for current in items:
                assert rpc is not None
                bound = limits.stage_out_limit(self.settings.limits, files, size)
                flags = {**who, "optional": optional[current[0]], "limit": bound}
                await self._out_one(rpc, current, job_key, ended_at, flags)
                done_bytes, done_files = self._staged(current[0])
                files, size = files + done_files, size + done_bytes
        except AgentError as exc:
            assert current is not None
            if exc.transient:
                self._requeue_out(action, _from(items, current), str(exc))
            else:
                self._fail(current[0], action, f"{_where(current)}{exc}")
                self._requeue_out(action, _from(items, current)[1:], "after another failed")
        except TransportError as exc:
            assert current is not None
            self._node_failed(action.node)
            self._requeue_out(action, _from(items, current), str(exc))

    async def _out_one(
        self,
        rpc: RpcClient,
        item: tuple[int, int, str, str, str, int],
        job_key: str,
        ended_at: float,
        flags: dict[str, Any],
    ) -> None:
        staging_id, request_id, src, dest, _text, _line = item
        bucket, key = parse_s3_url(dest)
        progress = self._progress.setdefault(staging_id, Progress())
        files = self._files.setdefault(staging_id, {})

        def on_progress(data: dict[str, Any]) -> None:
            _take(progress, data)
            for f in data.get("files", []):
                files[f["path"]] = f

        params = {
            "job": job_key,
            "user": flags["user"],
            "ended_at": ended_at,
            "trash_prefix": self.settings.stage_out.trash_prefix,
            "items": [
                {
                    "request_id": request_id,
                    "src": src,
                    "dest_bucket": bucket,
                    "dest_key": key,
                    "optional": flags["optional"],
                    "job_completed": flags["job_completed"],
                    "max_files": flags["limit"].max_files,
                    "max_bytes": flags["limit"].max_bytes,
                    "limit_reason": flags["limit"].reason,
                }
            ],
        }
        await rpc.call("stage_out", params, on_progress)
        self._finish(staging_id, progress)

    def _requeue_out(self, action: planner.StageOut, staging_ids: list[int], message: str) -> None:
        assert self.db is not None
        if not staging_ids:
            return
        with self.db.begin() as session:
            for staging_id in staging_ids:
                st = session.get_one(Staging, staging_id)
                _apply(st, self._progress.pop(staging_id, Progress()))
                self._save_files(session, st)
                give_up = st.attempts >= MAX_STAGE_OUT_ATTEMPTS
                st.state = "failed" if give_up else "queued"
                st.error = f"will retry: {message}" if not give_up else message
            log_event(session, action.job_id, action.node, f"stage-out retry: {message}", "warning")

    def _save_files(self, session: Session, st: Staging) -> None:
        """Record per-file outcomes reported by the agent (insert or update by path)."""
        files = self._files.pop(st.id, {})
        if not files:
            return
        known = {u.path: u for u in st.uploads}
        for path, f in ((stageout.shown(p), f) for p, f in files.items()):
            row = known.get(path) or Upload(staging_id=st.id, path=path)
            row.key, row.size, row.state = stageout.shown(f["key"]), int(f["size"]), f["state"]
            row.trash_key, row.error = stageout.shown(f["trash_key"]), stageout.shown(f["error"])
            row.updated_at = time.time()
            if path not in known:
                session.add(row)

    async def _release(self, action: planner.Release) -> None:
        assert self.db is not None
        with self.db.begin() as session:
            job_key = _job_key(session.get_one(Job, action.job_id))
        try:
            rpc = await self._agent(action.node)
            done = await rpc.call("release", {"job": job_key})
        except (AgentError, TransportError) as exc:
            log.warning("release of %s on %s failed: %s", job_key, action.node, exc)
            return
        # The job made part of its directory undeletable: released all the same, lease ended.
        left = f" (left for an admin: released/{done['leftover']})" if done.get("leftover") else ""
        with self.db.begin() as session:
            for st in _job_stagings(session, action.job_id, action.node):
                # A failure stays on record (status, `hpcstage env`) after its view is gone.
                if st.request.direction != "out" and st.state != "failed":
                    st.state = "released"
            log_event(session, action.job_id, action.node, f"view released: {action.reason}{left}")

    def _mark_released(self, job_id: int) -> None:
        assert self.db is not None
        with self.db.begin() as session:
            session.get_one(Job, job_id).released_at = time.time()

    def live_progress(self) -> dict[int, dict[str, int]]:
        """Per running staging id, the counters its agent reported since the last tick wrote
        them (what the API shows instead of the database's older numbers)."""
        return {staging_id: _columns(p) for staging_id, p in self._progress.items()}

    def _flush_progress(self, requeue: bool = False) -> None:
        if not self._progress or self.db is None:
            return
        with self.db.begin() as session:
            for staging_id, progress in self._progress.items():
                st = session.get(Staging, staging_id)
                if st is not None:
                    _apply(st, progress)
                    if requeue and st.state == "running":
                        st.state = "queued"

    # ------------------------------------------------------------------ directives

    async def _directives(self, info: JobInfo) -> Directives:
        """Find a job's directives where the site configured us to look, and authorize them."""
        watched = set(self.settings.slurm.partitions)
        if watched and not set(info.partition.split(",")) & watched:
            return Directives("none", [], [])  # not ours to stage (slurm.partitions)
        for source in self.settings.slurm.directives_from:
            try:
                parsed = await self._parsed(source, info)
            except DirectiveError as exc:  # our block, but unreadable: refuse the job
                found = Directives(source, [], [], error=str(exc))
            else:
                if parsed is None:
                    continue
                found = self._authorized(to_directives(source, parsed, info), info)
            self._audit_admission(found, info)
            return found
        return Directives("none", [], [])

    def _authorized(self, found: Directives, info: JobInfo) -> Directives:
        """Refuse the job if any directive reaches where its user/account may not."""
        wanted: list[tuple[policy.Access, str, str]] = [
            ("read", str(d["src"]), str(d["text"])) for d in found.stage_in
        ]
        wanted += [("write", str(d["dest"]), str(d["text"])) for d in found.stage_out]
        refusals = []
        for access, url, text in wanted:
            decision = policy.check(self.settings.policy, info.user, info.account, access, url)
            if not decision.allowed:
                refusals.append(f"{text}: refused: {decision.rule}")
        if not refusals:
            return found
        return Directives(found.source, [], [], error="; ".join(refusals))

    def _audit_admission(self, found: Directives, info: JobInfo) -> None:
        who = {"job": info.job_id, "user": info.user, "account": info.account}
        if found.error:
            self.audit.record("refused", **who, reason=found.error, source=found.source)
            return
        for d in found.stage_in:
            self.audit.record("stage-in", **who, src=d["src"], dest=d["dest"])
        for d in found.stage_out:
            self.audit.record("stage-out", **who, src=d["src"], dest=d["dest"])

    async def _parsed(self, source: str, info: JobInfo) -> dirs.ParsedDirectives | None:
        if source == "admin_comment":
            args = dirs.decode_admin_comment(info.admin_comment)
            return None if args is None else dirs.parse_args(args)
        assert self.backend is not None
        script = await self.backend.batch_script(info.job_id)
        return None if script is None else dirs.parse_script(script)

    # ------------------------------------------------------------------ agents

    async def _agent(self, node: str) -> RpcClient:
        assert self._pool is not None
        rpc = await self._pool.get(node)
        self._node_down.pop(node, None)
        return rpc

    def _node_failed(self, node: str) -> None:
        """Count a transport failure on ``node`` and hold its next attempt back (capped)."""
        failures = self._node_down.get(node, (0, 0.0))[0] + 1
        delay = reconnect_delay(failures)
        self._node_down[node] = (failures, time.time() + delay)
        log.warning("node %s: next attempt in %.0f s (failure %d in a row)", node, delay, failures)

    def _backing_off(self, node: str) -> bool:
        """True while ``node`` waits out its backoff (the main loop polls, so it is retried)."""
        down = self._node_down.get(node)
        return down is not None and time.time() < down[1]

    async def _open_agent(self, node: str) -> AgentSession:
        nodes = self.settings.nodes
        cache_dir = cache_dir_for(nodes.cache_dir, node)
        if nodes.transport == "local":
            return await open_local(node, agent_argv(self._agent_command, node, cache_dir))
        if node not in self._node_addr:
            await self._refresh_nodes()
        target = SshTarget(
            host=expand_node_template(nodes.address, node, self._node_addr.get(node, node)),
            port=nodes.ssh_port,
            user=nodes.ssh_user,
            key=str(nodes.ssh_key),
            known_hosts=str(nodes.ssh_known_hosts),
            command=agent_shell_command(self._agent_command, node, cache_dir),
            connect_timeout=nodes.connect_timeout,
        )
        return await open_ssh(node, target)

    async def _hello(self, node: str, rpc: RpcClient) -> None:
        s, t = self.settings.store, self.settings.transfer
        store = {
            "endpoint_url": s.endpoint_url,
            "region": self._region,
            "addressing_style": s.addressing_style,
            "verify_tls": s.verify_tls,
            "ca_bundle": str(s.ca_bundle or ""),
            "max_connections": s.max_connections,
            "connect_timeout": s.connect_timeout,
            "read_timeout": s.read_timeout,
            "credentials": self._credentials,
        }
        transfer = {
            "concurrency": t.concurrency,
            "part_size": t.part_size,
            "multipart_threshold": t.multipart_threshold,
            "retries": t.retries,
            "backoff_base": t.backoff_base,
            "backoff_max": t.backoff_max,
            "lean_get": t.lean_get,
            "direct_writes": t.direct_writes,
        }
        reply = await rpc.call("hello", {"store": store, "transfer": transfer})
        log.info("agent on %s ready: %s", node, reply.get("reconcile"))

    async def _refresh_nodes(self) -> None:
        assert self.backend is not None
        try:
            nodes = await self.backend.nodes()
        except SlurmError as exc:
            log.warning("cannot list nodes: %s", exc)
            return
        self._node_addr = {n.name: n.addr or n.hostname or n.name for n in nodes}

    # ------------------------------------------------------------------ node caches

    async def cache_usage(self, node: str) -> dict[str, Any]:
        """What the node's cache holds (bytes, objects, leased) and its job directories."""
        rpc = await self._agent(node)
        reply = await asyncio.wait_for(rpc.call("usage", {}), 30)
        reply["capacity"] = self.settings.cache.max_bytes
        return reply

    def known_nodes(self) -> list[str]:
        """Nodes Slurm reported at the last refresh."""
        return sorted(self._node_addr)

    async def unknown_nodes(self, nodes: Iterable[str]) -> list[str]:
        """Those of ``nodes`` Slurm does not know (asked again first if any looks new).

        Empty when Slurm's node list cannot be had at all: then the agent connection is
        what fails, with its own message.
        """
        cluster = set(self.settings.cache.cluster_nodes)  # cache nodes may be outside Slurm
        missing = [n for n in nodes if n not in self._node_addr and n not in cluster]
        if missing:
            await self._refresh_nodes()
            missing = [n for n in missing if n not in self._node_addr]
        return missing if self._node_addr else []

    async def evict_node(self, node: str) -> int:
        """Apply the eviction policy on ``node`` now (opening its agent session if needed);
        the number of objects evicted. Leased objects stay."""
        c = self.settings.cache
        params = {
            "max_bytes": c.max_bytes,
            "high": c.high_watermark,
            "low": c.low_watermark,
            "ttl": c.ttl,
            "max_objects": c.max_objects,
        }
        reply = await (await self._agent(node)).call("evict", params)
        return int(reply.get("evicted", 0))

    async def evict_all(self) -> dict[str, dict[str, int]]:
        """Apply the eviction policy on every node with an open agent session, all at once."""
        assert self._pool is not None

        async def one(node: str) -> tuple[str, int | None]:
            try:
                return node, await self.evict_node(node)
            except (AgentError, TransportError) as exc:
                log.warning("eviction on %s failed: %s", node, exc)
                return node, None

        done = await asyncio.gather(*(one(node) for node in self._pool.open_nodes()))
        return {node: {"evicted": count} for node, count in done if count is not None}

    async def _maybe_evict(self) -> None:
        if time.time() - self._last_eviction < EVICT_EVERY:
            return
        self._last_eviction = time.time()
        for node, reply in (await self.evict_all()).items():
            if reply["evicted"]:
                log.info("cache on %s: %d objects evicted by policy", node, reply["evicted"])

    # ------------------------------------------------------------------ recycle bin

    def store(self, bucket: str) -> contextlib.AbstractAsyncContextManager[S3Store]:
        """The daemon's own client for ``bucket`` (recycle bin: copies and deletes only), for
        an ``async with`` block; at most STORE_CLIENTS idle ones stay open."""
        return self._stores.lease(bucket)

    def _new_store(self, bucket: str) -> S3Store:
        s = self.settings.store
        return S3Store(
            s.endpoint_url,
            bucket,
            region=self._region,
            profile=s.profile,
            addressing_style=s.addressing_style,
            verify_tls=s.verify_tls,
            ca_bundle=str(s.ca_bundle) if s.ca_bundle else None,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            credentials=self._credentials,
        )

    def stage_out_buckets(self) -> list[str]:
        """Buckets that stage-out has written to (where recycle bins may exist)."""
        assert self.db is not None
        with self.db.begin() as session:
            dests = session.scalars(select(Request.dest).where(Request.direction == "out"))
            return sorted({parse_s3_url(d)[0] for d in dests})

    async def expire_trash(self) -> int:
        """Delete recycle-bin entries older than stage_out.trash_retention, in every bucket."""
        conf, deleted = self.settings.stage_out, 0
        for bucket in self.stage_out_buckets():
            async with self.store(bucket) as store:
                deleted += await trash.expire(
                    store, conf.trash_prefix, conf.trash_retention, time.time()
                )
        return deleted

    # ------------------------------------------------------------------ warmups

    def create_warmup(self, src: str, nodes: list[str], user: str, admin: bool = False) -> int:
        """Record a warmup of ``src`` on ``nodes``; the next tick starts it.

        PermissionError when the policy does not let ``user`` read ``src``, LimitError when
        ``user`` has too many warmups in flight or requested too many in the last minute
        (admins may warm anything, as often as they like: they run the site).
        """
        assert self.db is not None
        stage_in = dirs.parse_value("stage-in", src)
        decision = policy.check(self.settings.policy, user, "", "read", stage_in.src.url)
        if not (admin or decision.allowed):
            self.audit.record("refused", user=user, warmup=src, reason=decision.rule)
            raise PermissionError(f"warmup of {src} refused: {decision.rule}")
        refusal = "" if admin else self._warmup_refusal(user)
        if refusal:
            self.audit.record("refused", user=user, warmup=src, reason=refusal)
            raise LimitError(f"warmup of {src} refused: {refusal}")
        self.audit.record("warmup", user=user, src=stage_in.src.url, nodes=nodes)
        with self.db.begin() as session:
            job = Job(
                kind="warmup",
                name=f"warmup {src}",
                user=user,
                state="WARMUP",
                planned_nodes=",".join(nodes),
                first_seen=time.time(),
            )
            job.requests = [
                Request(
                    direction="in",
                    position=0,
                    src=stage_in.src.url,
                    dest=str(stage_in.dest),
                    line=0,
                    text=src,
                )
            ]
            session.add(job)
            session.flush()
            log_event(session, job.id, "", f"warmup of {src} on {', '.join(nodes)} requested")
            job_id = job.id
        self.wake()
        return job_id

    def _warmup_refusal(self, user: str) -> str:
        """Why ``user`` may not request another warmup now ('' if they may). Counted and
        recorded in one synchronous step of the loop: two requests cannot both slip under."""
        assert self.db is not None
        mine = select(func.count()).select_from(Job).where(Job.kind == "warmup", Job.user == user)
        with self.db.begin() as session:
            in_flight = session.scalar(mine.where(Job.released_at.is_(None))) or 0
            recent = session.scalar(mine.where(Job.first_seen >= time.time() - 60)) or 0
        return limits.warmup_refusal(self.settings.limits, in_flight, recent)


def to_directives(source: str, parsed: dirs.ParsedDirectives, info: JobInfo) -> Directives:
    """What the watcher stores; any refused directive becomes the job's error."""
    if parsed.errors:
        problems = [describe(p) for p in parsed.errors]
        return Directives(source, [], [], error=dirs.summarize(problems))
    context = dirs.JobContext(
        job_id=info.job_id,
        user=info.user,
        name=info.name,
        array_job_id=info.array_job_id,
        array_task_id=info.array_task_id,
    )
    stage_in: list[dict[str, object]] = [
        {"src": d.src.url, "dest": str(d.dest), "line": d.line, "text": d.text}
        for d in parsed.stage_in
    ]
    try:
        # Expanded here, then checked again: a job name may hold '..' or '/'.
        outs = [dirs.expand_stage_out(d, context) for d in parsed.stage_out]
    except DirectiveError as exc:
        return Directives(source, [], [], error=str(exc))
    stage_out: list[dict[str, object]] = [
        {
            "src": str(d.src),
            "dest": d.dest_url,
            "line": d.line,
            "text": d.text,
            "when": d.when.value,
            "optional": d.optional,
        }
        for d in outs
    ]
    return Directives(source, stage_in, stage_out)


def describe(problem: dirs.DirectiveProblem) -> str:
    """A refused directive for users: its line when known, its text, and why."""
    where = f"line {problem.line}: " if problem.line else ""
    return f"{where}{dirs.shown(problem.text)}: {problem.message}"


def source_params(src: str) -> dict[str, Any]:
    """A stored source URL as the agent's ``source`` parameter."""
    source = dirs.parse_source(src)
    return {"kind": source.kind, "bucket": source.bucket, "key": source.key, "path": source.path}


def _from(
    items: list[tuple[int, int, str, str, str, int]],
    current: tuple[int, int, str, str, str, int] | None,
) -> list[int]:
    """Staging ids of ``current`` and every item after it (those not finished yet)."""
    ids = [item[0] for item in items]
    return ids[ids.index(current[0]) :] if current is not None and current[0] in ids else ids


def _where(item: tuple[int, int, str, str, str, int]) -> str:
    """'line N: <directive>: ' for messages about one directive."""
    return (f"line {item[5]}: " if item[5] else "") + f"{item[4]}: "


def _take(progress: Progress, data: dict[str, Any]) -> None:
    progress.files_done = int(data.get("files_done", 0))
    progress.bytes_done = int(data.get("bytes_done", 0))
    progress.files_total = data.get("files_total")
    progress.bytes_total = data.get("bytes_total")
    progress.fetched = int(data.get("fetched", 0))


def _job_key(job: Job) -> str:
    return str(job.slurm_id) if job.kind == "job" else f"warmup-{job.id}"


def _staging(session: Session, request: Request, node: str) -> Staging:
    found = session.scalar(
        select(Staging).where(Staging.request_id == request.id, Staging.node == node)
    )
    if found is None:
        found = Staging(request_id=request.id, node=node, state="queued")
        session.add(found)
        session.flush()
    return found


def _job_stagings(session: Session, job_id: int, node: str) -> list[Staging]:
    query = select(Staging).join(Request).where(Request.job_id == job_id, Staging.node == node)
    return list(session.scalars(query))


def _columns(progress: Progress) -> dict[str, int]:
    """The staging columns ``progress`` sets (totals only once the agent knows them)."""
    columns = {
        "files_done": progress.files_done,
        "bytes_done": progress.bytes_done,
        "fetched_files": progress.fetched,
    }
    if progress.files_total is not None:
        columns["files_total"] = progress.files_total
    if progress.bytes_total is not None:
        columns["bytes_total"] = progress.bytes_total
    return columns


def _apply(st: Staging, progress: Progress) -> None:
    for name, value in _columns(progress).items():
        setattr(st, name, value)

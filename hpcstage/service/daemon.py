"""The site daemon: watch Slurm, plan, and have node agents stage; serve the API.

Lifecycle (as uvicorn's server): startup -> main loop -> shutdown. SIGTERM/SIGINT drain:
no new transfers start, running ones are cancelled and left ``queued`` in the database, so a
restarted daemon resumes them (the agents' caches keep every object already verified).
A second signal exits at once.

This module holds the lifecycle and the wiring only; the work is done by the parts built at
start-up: admission (``watch.admission``), the executor and its actions (``staging``), the
agent sessions (``staging.nodes``), warmups, kept-warm datasets, the nodes' caches, the
recycle bins, and the periodic chores (``service.timers``). The methods under "for the API"
delegate to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from hpcstage.config.schema import Settings
from hpcstage.core import plan as planner
from hpcstage.core.fencing import Epoch, describe
from hpcstage.core.packing import PackRequest
from hpcstage.db import open_db, take_epoch
from hpcstage.db.changes import Changes, pack_key
from hpcstage.errors import SlurmError, StateUnavailable, StoreError, TransportError
from hpcstage.service import leader
from hpcstage.service.audit import AuditLog
from hpcstage.service.timers import Timers
from hpcstage.staging.access import StoreAccess
from hpcstage.staging.bins import RecycleBins, stage_out_buckets
from hpcstage.staging.caches import NodeCaches
from hpcstage.staging.executor import Executor
from hpcstage.staging.holdings import Holdings
from hpcstage.staging.keepwarm import KeepWarm, PinRequest
from hpcstage.staging.meters import Meters
from hpcstage.staging.nodes import NodeAgents
from hpcstage.staging.packs import Packs
from hpcstage.staging.records import ready_where_running
from hpcstage.staging.warmups import Warmups
from hpcstage.store.credentials import CredentialSource
from hpcstage.store.s3 import S3Store
from hpcstage.watch import tickview
from hpcstage.watch.admission import Admission
from hpcstage.watch.fold import Folded, JobKey, sync
from hpcstage.watch.slurm.backend import CliBackend, SlurmBackend
from hpcstage.watch.slurm.model import QueueSnapshot

log = logging.getLogger("hpcstage.daemon")  # the name sites filter on (the module moved)

SNAPSHOT_REUSE = 2.0  # seconds an early tick may plan on the last queue snapshot
ADMIT_PAUSE = 0.05  # seconds between the ticks that admit a large queue in slices


@dataclass(frozen=True)
class Parts:
    """What the daemon wires together at start-up (once it holds the state)."""

    nodes: NodeAgents
    executor: Executor
    admission: Admission
    warmups: Warmups
    keep: KeepWarm  # ``hpcstage pin``
    packs: Packs
    caches: NodeCaches
    holdings: Holdings
    timers: Timers


@dataclass
class Daemon:
    """One site daemon. ``run()`` until stopped; ``tick()`` is one watch-plan-act round."""

    settings: Settings
    backend: SlurmBackend | None = None
    db: sessionmaker[Session] | None = None
    changes: Changes = field(default_factory=Changes)  # committed writes, for long polling
    exit_code: int = 0  # of `hpcstage daemon`: 3 when the state's lock was lost
    audit: AuditLog = field(init=False)
    last_tick: float = 0.0
    last_error: str = ""
    access: StoreAccess = field(default_factory=StoreAccess)
    meters: Meters = field(default_factory=Meters)  # what /metrics counts (staging/meters.py)
    bins: RecycleBins = field(init=False)
    _parts: Parts | None = None
    _ignored: set[JobKey] = field(default_factory=set)
    _folded: Folded = field(default_factory=Folded)  # unchanged jobs are skipped
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _snapshot_at: float = -math.inf  # time.monotonic() of the last queue snapshot
    _snapshot: QueueSnapshot | None = None  # the last one (admitted in slices: fold.sync)
    _want_fresh: bool = False
    _lock: leader.StateLock | None = None
    epoch: Epoch | None = None  # this daemon's leader epoch, once it has started

    # ------------------------------------------------------------------ lifecycle

    def __post_init__(self) -> None:
        self.audit = AuditLog(Path(self.settings.site.state_dir) / "audit.jsonl")
        self.bins = RecycleBins(self.settings, self.access)

    @property
    def parts(self) -> Parts:
        """The parts wired at start-up (an error before it)."""
        assert self._parts is not None, "the daemon has not started"
        return self._parts

    async def startup(self) -> None:
        """Open state, resume interrupted work, prepare the Slurm backend and agents."""
        if self.db is None:
            self.db = open_db(self.settings.site.state_url)
        # A new term of leadership: agents of earlier ones (a dead leader's, still running on
        # the nodes) stop writing once this daemon's agents claim their caches.
        self.epoch = await asyncio.to_thread(take_epoch, self.db, leader.me())
        log.info("leader %s", describe(self.epoch))
        self.changes.watch(self.db)
        self.changes.bind(asyncio.get_running_loop())
        if self.backend is None:
            bin_dir = str(self.settings.slurm.bin_dir or "")
            self.backend = CliBackend(bin_dir=bin_dir)
        creds = CredentialSource(self.settings.store.profile or None)
        self.access.credentials = creds.current()
        self.access.region = creds.region(self.settings.store.region)
        self._parts = self._wire(self.db, self.backend, creds)
        log.info("agents start with: %s", self._parts.nodes.agent_command)
        self._parts.executor.recover()
        self._parts.packs.recover()
        self._parts.packs.start_due()  # packs a stopped daemon left: they resume
        await self._parts.nodes.refresh_nodes()

    def _wire(
        self, db: sessionmaker[Session], backend: SlurmBackend, creds: CredentialSource
    ) -> Parts:
        nodes = NodeAgents(self.settings, backend, self.access, self.epoch)
        caches = NodeCaches(self.settings, nodes, self.meters)
        return Parts(
            nodes=nodes,
            executor=Executor(
                self.settings, db, nodes, self._wake.set, self.bins.store, self.meters
            ),
            admission=Admission(self.settings, backend, self.audit.record),
            warmups=Warmups(self.settings, db, self.audit.record, self.wake),
            keep=KeepWarm(db, self.audit.record, self.wake),
            packs=Packs(self.settings, db, self.audit.record, self._pack_changed),
            caches=caches,
            holdings=Holdings(self.settings, nodes, self.bins.store, self.audit.record),
            timers=Timers(db, nodes, caches, self.bins, self.access, creds),
        )

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
            except StateUnavailable as exc:
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
                await self.parts.timers.run_due()
            except (SlurmError, TransportError, StoreError) as exc:
                # Slurm or a node may be briefly unreachable: log and carry on.
                self.last_error = str(exc)
                log.error("tick failed: %s", exc)
            self._wake.clear()
            woken = False
            if self.admitting:  # more of the queue to admit: a tick again, soon
                await asyncio.sleep(ADMIT_PAUSE)  # the API and agents get the loop first
                woken = True
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
                woken = True

    async def shutdown(self) -> None:
        """Cancel transfers (they stay queued in the database) and close agent sessions."""
        if self._parts is not None:
            await self._parts.packs.close()
            await self._parts.executor.cancel()
            if self.exit_code != 3:  # with the lock lost, the state is the next daemon's
                self._parts.executor.flush_progress(requeue=True)
            await self._parts.nodes.close()
        await self.bins.close()

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
        executor = self.parts.executor
        # A queue admitted in slices is admitted from one snapshot (asking squeue for 12,000
        # jobs again every slice would cost more than the slice); a timed tick asks anew.
        reuse_for = self.settings.slurm.poll_interval if self._folded.deferred else SNAPSHOT_REUSE
        fresh = not reuse_snapshot or time.monotonic() - self._snapshot_at >= reuse_for
        if fresh or self._snapshot is None:
            self._snapshot = await self.backend.snapshot()
            self._snapshot_at = time.monotonic()
            if self.settings.slurm.power_saving:  # which nodes are powered down, with the queue
                await self.parts.nodes.refresh_nodes()
        if fresh or self._folded.deferred:  # else nothing new to fold
            with self.db.begin() as session:
                admit = self.parts.admission.directives
                await sync(session, self._snapshot, admit, self._ignored, self._folded)
            self._folded.commit()
            if self._folded.deferred:
                log.info("%d new jobs are admitted at the next tick", self._folded.deferred)
        executor.flush_progress()
        self.parts.keep.run_due()  # kept-warm datasets due for a refresh, or expired
        with self.db.begin() as session:
            views = list(tickview.read_views(session))  # plain columns: no ORM object each
            if self.settings.cache.hedge_nodes and self._snapshot is not None:
                cache = self.settings.cache
                views = tickview.with_hedges(
                    session, views, self._snapshot, cache.hedge_nodes, cache.hedge_bytes
                )
            self._end_waits(session)
        actions = planner.plan(
            views,
            time.time(),
            self.settings.cache.lease_grace,
            executor.inflight(),
            cache_nodes=self.settings.cache.cluster_nodes,
            awake=self.parts.nodes.awake() if self.settings.slurm.power_saving else None,
        )
        for action in actions:
            executor.act(action)
        self.last_tick = time.time()

    @property
    def admitting(self) -> int:
        """New jobs of the last snapshot still to be admitted (a large queue goes in slices)."""
        return self._folded.deferred

    # ------------------------------------------------------------------ for the API

    def live_progress(self) -> dict[int, dict[str, int]]:
        """Per running staging id, the counters its agent reported since the last tick wrote
        them (what the API shows instead of the database's older numbers)."""
        return {} if self._parts is None else self._parts.executor.live_progress()

    async def cache_usage(self, node: str) -> dict[str, Any]:
        """What the node's cache holds (bytes, objects, leased) and its job directories."""
        return await self.parts.caches.usage(node)

    def known_nodes(self) -> list[str]:
        """Nodes Slurm reported at the last refresh."""
        return self.parts.nodes.known_nodes()

    async def unknown_nodes(self, nodes: Iterable[str]) -> list[str]:
        """Those of ``nodes`` Slurm does not know (asked again first if any looks new)."""
        return await self.parts.nodes.unknown_nodes(nodes)

    async def evict_node(self, node: str) -> int:
        """Apply the eviction policy on ``node`` now; the number of objects evicted."""
        return await self.parts.caches.evict_node(node)

    async def check_source(
        self, src: str, nodes: list[str], user: str, admin: bool = False
    ) -> dict[str, Any]:
        """How much of ``src``'s current objects each node's cache holds (see Holdings)."""
        return await self.parts.holdings.check(src, nodes, user, admin)

    async def evict_source(
        self, src: str, nodes: list[str], user: str, admin: bool = False
    ) -> dict[str, Any]:
        """Evict ``src``'s cached objects on ``nodes``, those in use excepted (Holdings)."""
        return await self.parts.holdings.evict(src, nodes, user, admin)

    def store(self, bucket: str) -> contextlib.AbstractAsyncContextManager[S3Store]:
        """The daemon's own client for ``bucket`` (recycle bin: copies and deletes only), for
        an ``async with`` block; at most STORE_CLIENTS idle ones stay open."""
        return self.bins.store(bucket)

    def stage_out_buckets(self) -> list[str]:
        """Buckets that stage-out has written to (where recycle bins may exist)."""
        assert self.db is not None
        return stage_out_buckets(self.db)

    def create_warmup(self, src: str, nodes: list[str], user: str, admin: bool = False) -> int:
        """Record a warmup of ``src`` on ``nodes``; the next tick starts it (see Warmups)."""
        return self.parts.warmups.create(src, nodes, user, admin)

    def create_pin(self, pin: PinRequest, user: str, admin: bool = False) -> int:
        """Keep a dataset warm on nodes (``hpcstage pin add``); its id (see KeepWarm)."""
        return self.parts.keep.create(pin, user, admin)

    def remove_pin(self, pin_id: int, user: str, admin: bool = False) -> bool:
        """Stop keeping ``pin_id`` warm; False if there is no such pin (see KeepWarm)."""
        return self.parts.keep.remove(pin_id, user, admin)

    def create_pack(self, request: PackRequest, user: str, admin: bool = False) -> int:
        """Record a pack the daemon runs for ``user``; it starts when a slot is free (Packs)."""
        return self.parts.packs.create(request, user, admin)

    def pack_document(self, session: Session, row: Any) -> dict[str, Any]:
        """A daemon pack's status, with live progress while it runs."""
        doc = self.parts.packs.document(session, row)
        doc["changes"] = self.changes.count
        return doc

    def _pack_changed(self, pack_id: int) -> None:
        self.changes.bump({pack_key(pack_id)})

    def job_asked(self, job_id: int) -> None:
        """The job (its row id) asked for its inputs (``hpcstage env``, once it runs): where
        the daemon learns that a job waits for its data, for /metrics."""
        assert self.db is not None
        with self.db.begin() as session:
            ready = ready_where_running(session, job_id)
        self.meters.job_asked(job_id, ready)

    def _end_waits(self, session: Session) -> None:
        """Jobs that asked before the daemon saw them run may find their inputs ready once it
        does, without a transfer ending (staged ahead on the node it got): for /metrics."""
        for job_id in self.meters.waiting():
            if ready_where_running(session, job_id):
                self.meters.wait_over(job_id)

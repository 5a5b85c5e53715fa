"""Stage-in: have a node's agent fetch a job's inputs (or a warmup's) into its cache and view.

One attempt stages the job's inputs on one node in directive order, within the job's quota and
object budget; objects another node's cache holds are copied from it first (peer copy), and
nodes that need a source at the same time fetch it from the store once: the first stages it,
the others wait for it and copy from its cache.
A store that is down or a node that cannot be reached requeues what is left; any other refusal
by the agent fails the staging with the agent's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.config.schema import Settings
from hpcstage.core import limits, quota
from hpcstage.core import plan as planner
from hpcstage.core.directives import SourceKind
from hpcstage.core.rules import Progress, StagingItem, remaining, take
from hpcstage.core.units import format_size
from hpcstage.db import Job, Request, Staging
from hpcstage.errors import AgentError, TransportError
from hpcstage.protocol.framing import RpcClient
from hpcstage.protocol.messages import (
    NO_LIMITS,
    SourceSpec,
    StageItem,
    StageProgress,
    StageRequest,
)
from hpcstage.staging import peer
from hpcstage.staging import rates as rate_shares
from hpcstage.staging.agents import AgentClient
from hpcstage.staging.meters import StageCounts
from hpcstage.staging.nodes import NodePool
from hpcstage.staging.pin import OpenStore, Pinner
from hpcstage.staging.rates import RateShares
from hpcstage.staging.records import StagingRecords, apply, droppable, key_of, staging_row
from hpcstage.watch.fold import log_event

log = logging.getLogger("hpcstage.daemon")  # the daemon's log: the name sites filter on

MAX_TRANSPORT_ATTEMPTS = 5
# Relayed peer copies (small objects) at once: their bytes cross the daemon host, which must
# not become the bottleneck of a job array starting on a hundred nodes (those beyond it fetch
# their small objects from the store). Node-to-node copies (big objects) are not rationed.
PEER_COPIES = 2

K = TypeVar("K")


@contextlib.asynccontextmanager
async def _turn(table: dict[K, asyncio.Event], key: K) -> AsyncIterator[None]:
    """Run once nobody holds ``key`` in ``table``; hold it meanwhile."""
    while (other := table.get(key)) is not None:
        await other.wait()
    done = table[key] = asyncio.Event()
    try:
        yield
    finally:
        del table[key]
        done.set()


@dataclass
class StageIn:
    """Runs stage-in attempts, one job on one node each."""

    settings: Settings
    db: sessionmaker[Session]
    nodes: NodePool
    records: StagingRecords
    stores: OpenStore | None = None  # the daemon's store clients (pins packed versions)
    rates: RateShares | None = None  # each node's store rate limits (None: none)
    _peer_copies: int = 0  # relayed copies running now (at most PEER_COPIES)
    _pinner: Pinner = field(init=False)
    # Sources a node is fetching now for the others of its group (transfer.peer_groups), by
    # (src, group): they wait, then copy from it.
    _leading: dict[tuple[str, int], asyncio.Event] = field(default_factory=dict)
    _leaders: dict[tuple[str, int], str] = field(default_factory=dict)  # their nodes
    # Sources being staged now, by (src, node): a second stage there waits for the first.
    _on_node: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._pinner = Pinner(self.db, self.stores)

    async def run(self, action: planner.Stage) -> None:
        """One attempt: every input of the job on ``action.node``."""
        with self.db.begin() as session:
            job = session.get_one(Job, action.job_id)
            requests = [r for r in job.requests if r.direction in ("in", "dir")]
            # The agent's "stage" parameters but the items; a warmup only fills the cache; a
            # kept-warm dataset's view is the service account's alone (no user's ACL entry).
            user = "" if job.kind == "pin" else job.user
            # The job runs: it waits at `hpcstage env` for this stage (staging/peer.py).
            waited_on = job.kind == "job" and job.state in planner.RUNNING_JOB_STATES
            call = StageRequest(
                key_of(job), user, view=job.kind != "warmup", items=[], rates=NO_LIMITS
            )
            log_event(session, job.id, action.node, f"staging: {action.reason}")
            stagings = [staging_row(session, r, action.node) for r in requests]
            for st in stagings:
                st.state, st.started_at, st.error = "running", time.time(), ""
                st.peer_files = 0  # counted per attempt, like fetched_files
                st.attempts += 1
            plan = [
                StagingItem(st.id, r.id, r.src, r.dest, r.text, r.line)
                for st, r in zip(stagings, requests, strict=True)
            ]
        current = plan[0] if plan else None
        limit: quota.Budget | None = None
        try:
            rpc = await self.nodes.agent(action.node)
            spent = objects = 0
            for current in plan:
                staging_id, request_id = current.staging_id, current.request_id
                # A packed dataset's version is settled once, for every node (staging/pin.py).
                src = await self._pinner.pinned(request_id, current.src)
                dest = current.dest
                limit = self._budget(action.job_id, action.node, spent, current.src)
                left = limits.stage_in_budget(self.settings.limits, objects)
                async with self._fan_out(action.job_id, src, action.node):
                    if src:
                        await self._peer_fill(rpc, action, staging_id, src, limit, waited_on)
                    await self._stage_one(rpc, staging_id, call, request_id, src, dest, limit, left)
                done_bytes, done_files = self.records.staged(staging_id)
                spent, objects = spent + done_bytes, objects + done_files
        except AgentError as exc:
            assert current is not None
            if exc.transient:  # the store was down or throttling: try again later
                self._requeue(action, remaining(plan, current), str(exc))
            else:
                # Over the job's own limit is the job's failure wherever it runs.
                node_only = exc.node_only and not (limit is not None and limit.per_job)
                message = f"{current.where()}{exc}"
                if node_only:
                    message = f"on {action.node}: {message}"
                self.records.fail(current.staging_id, action, message, node_only)
        except TransportError as exc:
            if not self.nodes.powered_down(action.node):  # else no backoff: it is off, not ill
                self.nodes.node_failed(action.node)
            self._requeue(action, remaining(plan, current), str(exc))

    @contextlib.asynccontextmanager
    async def _fan_out(self, job_id: int, src: str, node: str) -> AsyncIterator[None]:
        """Stage ``src`` on ``node`` so that the store serves it once to the nodes that need
        it at the same time (a multi-node job, an array), and each node gets it once.

        On one node, a stage of ``src`` waits for the one running there (a job of the same
        array, say): it then finds the objects cached, rather than copy them a second time.
        Across the nodes of a group (``transfer.peer_groups``; by default the cluster), the
        first stage of ``src`` fetches it and the others wait for it to end, then copy from
        its cache (``_peer_fill``) in parallel with each other; a stage that can copy from a
        node holding it already needs nobody to wait for it. A first stage waits for nothing
        more once it is first, so no two stages wait for each other; if it fails, the others
        fetch from the store themselves.
        """
        if not (src and self.settings.transfer.peer_copy and peer.copyable(SourceSpec.of(src))):
            yield
            return
        async with _turn(self._on_node, (src, node)):
            fetching = (src, self._group(node))
            first = self._leading.get(fetching)
            if first is not None:
                self._waiting(job_id, node, src, self._leaders.get(fetching, "another node"))
                await first.wait()
                yield
                return
            if self._peers_holding(src, node):
                yield
                return
            async with _turn(self._leading, fetching):
                self._leaders[fetching] = node
                try:
                    yield
                finally:
                    del self._leaders[fetching]

    def _waiting(self, job_id: int, node: str, src: str, leader: str) -> None:
        """Say in the job's events why its staging on ``node`` shows no progress yet."""
        with self.db.begin() as session:
            message = f"waiting for {leader} to fetch {src} from the store, to copy it from there"
            log_event(session, job_id, node, message)

    def _group(self, node: str) -> int:
        """The index of ``node``'s group in ``transfer.peer_groups`` (-1: in none)."""
        for index, group in enumerate(self.settings.transfer.peer_groups):
            if node in group:
                return index
        return -1

    async def _peer_fill(
        self,
        rpc: RpcClient,
        action: planner.Stage,
        staging_id: int,
        src: str,
        limit: quota.Budget,
        waited_on: bool = False,
    ) -> None:
        """Copy the objects of ``src`` another node's cache holds (staging/peer.py), counted
        in the staging's ``peer_files``. For a job that runs (``waited_on``) every object goes
        node to node where ``transfer.peer_direct`` allows, so it neither waits for nor takes
        one of the daemon's ``PEER_COPIES`` relays.

        Never fails the staging: whatever is not copied, the stage fetches from the store.
        """
        source = SourceSpec.of(src)
        if not self.settings.transfer.peer_copy or not peer.copyable(source):
            return
        for other in self._peers_holding(src, action.node):
            direct_host = (
                self.nodes.peer_address(other) if self.settings.transfer.peer_direct else ""
            )
            all_direct = waited_on and bool(direct_host)
            route = peer.Route(
                relay=not all_direct and self._peer_copies < PEER_COPIES,
                direct_host=direct_host,
                small_direct=all_direct,
            )
            if not route.relay and not route.direct_host:
                return
            self._peer_copies += route.relay
            try:
                copied = await peer.copy_from_peer(
                    AgentClient(rpc, action.node),
                    AgentClient(await self.nodes.agent(other), other),
                    source,
                    route,
                    limit.max_bytes,
                )
            except (AgentError, TransportError, LookupError, TypeError, ValueError) as exc:
                log.warning("peer copy of %s from %s to %s: %s", src, other, action.node, exc)
                continue
            finally:
                self._peer_copies -= route.relay
            self.records.meters.peer_copied(action.node, copied.objects, copied.bytes)
            if copied.objects or copied.refused:
                message = (
                    f"copied {copied.objects} objects ({format_size(copied.bytes)}) of {src}"
                    f" from {other}'s cache"
                )
                if copied.refused:
                    message += (
                        f"; {copied.refused} failed verification or could not be read"
                        " (fetched from the store)"
                    )
                with self.db.begin() as session:
                    session.get_one(Staging, staging_id).peer_files += copied.objects
                    log_event(session, action.job_id, action.node, message)
            return

    def _peers_holding(self, src: str, node: str) -> list[str]:
        """Other nodes of ``node``'s group whose staging of ``src`` finished (their caches
        likely hold it).

        None when ``node`` itself staged ``src`` before: its cache likely holds it already,
        and asking a peer page by page what it lacks would cost more than the stage's own
        listing finding the few objects evicted since.
        """
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
        known = set(self.nodes.known_nodes()) | set(self.settings.cache.cluster_nodes)
        group = self._group(node)
        return [
            n
            for n in sorted(found)
            if n in known and self._group(n) == group and not self.nodes.backing_off(n)
        ]

    async def _stage_one(
        self,
        rpc: RpcClient,
        staging_id: int,
        call: StageRequest,
        request_id: int,
        src: str,
        dest: str,
        limit: quota.Budget,
        objects: limits.ObjectBudget,
    ) -> None:
        progress = self.records.progress.setdefault(staging_id, Progress())
        source = SourceSpec.of(src) if src else None
        packed = source is not None and source.kind is SourceKind.S3_PACKED
        counts = StageCounts(self.records.meters, rpc.name, hits_known=not packed)

        def on_progress(data: StageProgress) -> None:
            take(progress, data)
            counts.seen(data)

        items = []
        if src:  # a "dir" request (stage-out only job) just needs the job directory
            items.append(
                StageItem(
                    request_id=request_id,
                    source=source or SourceSpec.of(src),
                    dest=dest,
                    max_bytes=limit.max_bytes,
                    quota_reason=limit.reason,
                    max_objects=objects.max_objects,
                    objects_reason=objects.reason,
                )
            )
        async with rate_shares.transferring(self.rates, rpc.name) as rates:
            request = dataclasses.replace(call, items=items, rates=rates)
            result = await AgentClient(rpc, rpc.name).stage(request, on_progress)
        for got in result.items:
            on_progress(got)
        self.records.finish(staging_id, progress)

    def _budget(self, job_id: int, node: str, spent: int, src: str) -> quota.Budget:
        """How many more bytes the job may stage on ``node`` (quotas; leases of others count).

        A dataset several jobs of the account hold on the node is one copy in the cache:
        counted once (its largest staging), and not at all against a job staging that same
        source, which counts it as its own."""
        with self.db.begin() as session:
            account = session.get_one(Job, job_id).account
            held = session.execute(
                select(Request.src, func.max(Staging.bytes_done))
                .join(Request, Staging.request_id == Request.id)
                .join(Job, Request.job_id == Job.id)
                .where(
                    Job.account == account,
                    Job.id != job_id,
                    Staging.node == node,
                    Request.direction == "in",
                    Staging.state.in_(("ready", "running")),
                )
                .group_by(Request.src)
            ).all()
        used = sum(int(size or 0) for held_src, size in held if held_src != src)
        return quota.budget(self.settings.quotas, account, node, spent, used)

    def _requeue(self, action: planner.Stage, staging_ids: list[int], message: str) -> None:
        with self.db.begin() as session:
            # A node out of reach for good is the node's failure: a job not running there
            # only loses the node (records.droppable), the plan moves on.
            job = session.get_one(Job, action.job_id)
            final = "dropped" if droppable(job, action.node) else "failed"
            # Slurm power saving took the node down (or it is booting): the attempt does not
            # count, the plan stages the node again once it is up.
            asleep = self.nodes.powered_down(action.node)
            gave_up = False
            for staging_id in staging_ids:
                st = session.get_one(Staging, staging_id)
                apply(st, self.records.progress.pop(staging_id, Progress()))
                if asleep:
                    st.attempts -= 1
                give_up = st.attempts >= MAX_TRANSPORT_ATTEMPTS
                gave_up = gave_up or give_up
                st.state = final if give_up else "queued"
                self.records.meters.attempt_ended("in", final if give_up else "requeued")
                st.error = f"node {action.node} unreachable: {message}"
            if not gave_up:
                log_event(session, job.id, action.node, f"will retry: {message}", "warning")
            elif final == "dropped":
                text = f"{action.node} dropped from the job's nodes: unreachable: {message}"
                log_event(session, job.id, action.node, text, "warning")
            else:
                text = f"failed: node {action.node} unreachable: {message}"
                log_event(session, job.id, action.node, text, "error")

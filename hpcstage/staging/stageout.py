"""Stage-out: have the batch host's agent upload a job's outputs, one directive at a time.

Directives whose ``when`` does not match how the job ended are skipped; the others run in
order within the job's output limits. A store that is down or a node that cannot be reached
requeues what is left (up to ``MAX_STAGE_OUT_ATTEMPTS``: outputs are worth waiting for); a
directive the agent refuses fails and the ones after it are tried again later.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from hpcstage.config.schema import Settings
from hpcstage.core import directives as dirs
from hpcstage.core import limits, stageout
from hpcstage.core import plan as planner
from hpcstage.core.rules import (
    OutputFlags,
    Progress,
    StagingItem,
    packed_writer,
    remaining,
    take,
)
from hpcstage.db import Job, Request, Staging
from hpcstage.errors import AgentError, TransportError
from hpcstage.protocol.framing import RpcClient
from hpcstage.protocol.messages import (
    NO_LIMITS,
    StageOutItem,
    StageOutProgress,
    StageOutRequest,
)
from hpcstage.staging import rates as rate_shares
from hpcstage.staging.agents import AgentClient
from hpcstage.staging.nodes import NodePool
from hpcstage.staging.rates import RateShares
from hpcstage.staging.records import StagingRecords, apply, key_of, staging_row
from hpcstage.store.protocol import parse_s3_url
from hpcstage.watch.fold import log_event, split_nodes

MAX_STAGE_OUT_ATTEMPTS = 200  # a store down for hours still gets the outputs in the end


@dataclass
class StageOut:
    """Runs stage-out attempts, one job on its batch host each."""

    settings: Settings
    db: sessionmaker[Session]
    nodes: NodePool
    records: StagingRecords
    rates: RateShares | None = None  # each node's store rate limits (None: none)

    async def run(self, action: planner.StageOut) -> None:
        """One attempt: every stage-out directive of the job that should run."""
        with self.db.begin() as session:
            job = session.get_one(Job, action.job_id)
            job_key, ended_at, items = key_of(job), job.ended_at or time.time(), []
            user, job_completed = job.user, job.state == "COMPLETED"
            # Per staging id: (optional, pack, writer), the directive's flags for the agent.
            flags_of: dict[int, tuple[bool, bool, str]] = {}
            submitted = job.submitted_at or job.first_seen
            on_states = frozenset(self.settings.stage_out.on_states)
            nodes = split_nodes(job.nodes)
            first = job.batch_host or next(iter(nodes), "")
            for r in (r for r in job.requests if r.direction == "out"):
                per_node = dirs.names_node(r.dest_template)
                if not per_node and action.node and action.node != first:
                    continue  # written back from the batch host (docs/slurm-integration.md)
                st = staging_row(session, r, action.node or "-")
                if st.state in ("ready", "skipped"):
                    continue  # done at an earlier attempt (another node's kept it waiting)
                run, why = stageout.should_run(r.when, job.state, on_states)
                if not action.node:
                    run, why = False, "the job never ran on a node: no outputs"
                if not run:
                    st.state, st.error, st.finished_at = "skipped", why, time.time()
                    continue
                dest = _dest_on(job, r, action.node, nodes) if per_node else r.dest
                st.state, st.started_at, st.error = "running", time.time(), ""
                st.attempts += 1
                items.append(StagingItem(st.id, r.id, r.src, dest, r.text, r.line))
                writer = packed_writer(job_key, submitted, r.position) if r.pack else ""
                flags_of[st.id] = (r.optional, r.pack, writer)
            log_event(session, job.id, action.node, f"stage-out of {len(items)} directive(s)")
        current = items[0] if items else None
        try:
            rpc = await self.nodes.agent(action.node) if items else None
            files = size = 0
            for current in items:
                assert rpc is not None
                bound = limits.stage_out_limit(self.settings.limits, files, size)
                optional, pack, writer = flags_of[current.staging_id]
                flags = OutputFlags(user, optional, job_completed, bound, pack, writer)
                await self._out_one(rpc, current, job_key, ended_at, flags)
                done_bytes, done_files = self.records.staged(current.staging_id)
                files, size = files + done_files, size + done_bytes
        except AgentError as exc:
            assert current is not None
            if exc.transient:
                self._requeue_out(action, remaining(items, current), str(exc))
            else:
                self.records.fail(current.staging_id, action, f"{current.where()}{exc}")
                self._requeue_out(action, remaining(items, current)[1:], "after another failed")
        except TransportError as exc:
            assert current is not None
            self.nodes.node_failed(action.node)
            self._requeue_out(action, remaining(items, current), str(exc))

    async def _out_one(
        self,
        rpc: RpcClient,
        item: StagingItem,
        job_key: str,
        ended_at: float,
        flags: OutputFlags,
    ) -> None:
        staging_id, request_id, src, dest = item.staging_id, item.request_id, item.src, item.dest
        bucket, key = parse_s3_url(dest)
        progress = self.records.progress.setdefault(staging_id, Progress())
        files = self.records.files.setdefault(staging_id, {})

        def on_progress(data: StageOutProgress) -> None:
            take(progress, data)
            for f in data.files:
                before = files.get(f.path)
                if f.state == "uploaded" and (before is None or before.state != "uploaded"):
                    self.records.meters.uploaded(rpc.name, f.size)
                files[f.path] = f

        params = StageOutRequest(
            job=job_key,
            user=flags.user,
            ended_at=ended_at,
            trash_prefix=self.settings.stage_out.trash_prefix,
            items=[
                StageOutItem(
                    request_id=request_id,
                    src=src,
                    dest_bucket=bucket,
                    dest_key=key,
                    optional=flags.optional,
                    job_completed=flags.job_completed,
                    max_files=flags.limit.max_files,
                    max_bytes=flags.limit.max_bytes,
                    limit_reason=flags.limit.reason,
                    pack=flags.pack,
                    writer=flags.writer,
                )
            ],
            rates=NO_LIMITS,  # the node's, as of the call: below
        )
        async with rate_shares.transferring(self.rates, rpc.name) as rates:
            params = dataclasses.replace(params, rates=rates)
            reply = await AgentClient(rpc, rpc.name).stage_out(params, on_progress)
        written = next((r.written for r in reply.items if r.request_id == request_id), "")
        self.records.finish(staging_id, progress, written)

    def _requeue_out(self, action: planner.StageOut, staging_ids: list[int], message: str) -> None:
        if not staging_ids:
            return
        with self.db.begin() as session:
            for staging_id in staging_ids:
                st = session.get_one(Staging, staging_id)
                apply(st, self.records.progress.pop(staging_id, Progress()))
                self.records.save_files(session, st)
                give_up = st.attempts >= MAX_STAGE_OUT_ATTEMPTS
                st.state = "failed" if give_up else "queued"
                self.records.meters.attempt_ended("out", "failed" if give_up else "requeued")
                st.error = f"will retry: {message}" if not give_up else message
            log_event(session, action.job_id, action.node, f"stage-out retry: {message}", "warning")


def _dest_on(job: Job, request: Request, node: str, nodes: tuple[str, ...]) -> str:
    """The DEST of an output naming the node (%N, %n), for ``node`` of the job."""
    context = dirs.JobContext(
        job_id=job.slurm_id or 0,
        user=job.user,
        name=job.name,
        array_job_id=job.array_job_id,
        array_task_id=job.array_task_id,
        node=node,
        node_index=nodes.index(node) if node in nodes else 0,
    )
    return dirs.expand_dest_template(request.dest_template, request.pack, context)

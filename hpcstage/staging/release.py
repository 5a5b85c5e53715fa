"""Release: end a job's lease on a node (its view goes, its cached objects may be evicted)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from hpcstage.core import plan as planner
from hpcstage.db import Job
from hpcstage.errors import AgentError, TransportError
from hpcstage.protocol.messages import ReleaseRequest
from hpcstage.staging.agents import AgentClient
from hpcstage.staging.nodes import NodePool
from hpcstage.staging.records import job_stagings, key_of
from hpcstage.watch.fold import log_event

log = logging.getLogger("hpcstage.daemon")  # the daemon's log: the name sites filter on


@dataclass
class Releaser:
    """Has agents remove the views of jobs that are done, and marks jobs released."""

    db: sessionmaker[Session]
    nodes: NodePool

    async def run(self, action: planner.Release) -> None:
        """Release the job's view on ``action.node``; a failure is logged and tried next tick."""
        with self.db.begin() as session:
            job_key = key_of(session.get_one(Job, action.job_id))
        try:
            rpc = await self.nodes.agent(action.node)
            done = await AgentClient(rpc, action.node).release(ReleaseRequest(job_key))
        except (AgentError, TransportError) as exc:
            log.warning("release of %s on %s failed: %s", job_key, action.node, exc)
            return
        # The job made part of its directory undeletable: released all the same, lease ended.
        left = f" (left for an admin: released/{done.leftover})" if done.leftover else ""
        with self.db.begin() as session:
            for st in job_stagings(session, action.job_id, action.node):
                # A failure stays on record (status, `hpcstage env`) after its view is gone.
                if st.request.direction != "out" and st.state != "failed":
                    st.state = "released"
            log_event(session, action.job_id, action.node, f"view released: {action.reason}{left}")

    def mark_released(self, job_id: int) -> None:
        """The job holds no lease anywhere any more."""
        with self.db.begin() as session:
            session.get_one(Job, job_id).released_at = time.time()

"""The executor: turns the plan's actions into tasks and keeps track of them.

At most one task runs per (job, node); a node waiting out its backoff gets none. When a task
ends the daemon is woken (a finished transfer may unblock the next one); a task that raised
(a bug, an unexpected library error) never leaves its stagings running: they are queued
again, or failed after ``MAX_INTERNAL_ERROR_ATTEMPTS``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from hpcstage.config.schema import Settings
from hpcstage.core import plan as planner
from hpcstage.staging.meters import Meters
from hpcstage.staging.nodes import NodePool
from hpcstage.staging.pin import OpenStore
from hpcstage.staging.rates import RateShares
from hpcstage.staging.records import StagingRecords, requeue_running
from hpcstage.staging.release import Releaser
from hpcstage.staging.stagein import StageIn
from hpcstage.staging.stageout import StageOut

log = logging.getLogger("hpcstage.daemon")  # the daemon's log: the name sites filter on

TaskKey = tuple[int, str]  # (job id, node)


class Executor:
    """Runs the plan's actions as asyncio tasks, one per job and node."""

    def __init__(
        self,
        settings: Settings,
        db: sessionmaker[Session],
        nodes: NodePool,
        wake: Callable[[], None] = lambda: None,
        stores: OpenStore | None = None,
        meters: Meters | None = None,
    ) -> None:
        self.nodes = nodes
        self.records = StagingRecords(db, meters=meters or Meters())
        rates = RateShares(settings.transfer, nodes)  # shared: a site limit counts both
        self.stage_in = StageIn(settings, db, nodes, self.records, stores, rates)
        self.stage_out = StageOut(settings, db, nodes, self.records, rates)
        self.releaser = Releaser(db, nodes)
        self.tasks: dict[TaskKey, asyncio.Task[None]] = {}
        self._db = db
        self._wake = wake

    def recover(self) -> None:
        """At start-up: transfers that were running when we stopped are simply queued again
        (the agents' caches keep every object already verified)."""
        requeue_running(self._db)

    def inflight(self) -> dict[str, int]:
        """Running tasks per node (the planner bounds them)."""
        found: dict[str, int] = {}
        for _, node in self.tasks:
            found[node] = found.get(node, 0) + 1
        return found

    def act(self, action: planner.Action) -> None:
        """Start ``action`` unless one runs for its job and node or the node is backing off."""
        if isinstance(action, planner.MarkReleased):
            self.releaser.mark_released(action.job_id)
            return
        if isinstance(action, planner.Restage):  # the node sleeps: nothing to reach
            self.records.restage(action.job_id, action.node, action.reason)
            return
        key = (action.job_id, action.node)
        if key in self.tasks or self.nodes.backing_off(action.node):
            return
        coro: Coroutine[Any, Any, None]
        if isinstance(action, planner.Stage):
            coro = self.stage_in.run(action)
        elif isinstance(action, planner.StageOut):
            coro = self.stage_out.run(action)
        else:
            coro = self.releaser.run(action)
        task = asyncio.create_task(coro, name=f"{type(action).__name__}-{key}")
        self.tasks[key] = task
        task.add_done_callback(functools.partial(self.done, key))

    def done(self, key: TaskKey, task: asyncio.Task[None]) -> None:
        """A task ended: forget it, wake the daemon, and recover from what it raised."""
        self.tasks.pop(key, None)
        self._wake()  # a finished transfer may unblock the next one
        if task.cancelled() or task.exception() is None:
            return
        # A bug or an unexpected library error: never leave stagings 'running' for good.
        exc = task.exception()
        log.error("action on job %s node %s failed: %r", key[0], key[1], exc, exc_info=exc)
        self.records.recover(key[0], key[1], f"internal error: {type(exc).__name__}: {exc}")

    async def cancel(self) -> None:
        """Cancel every task and wait for them (their stagings stay running until flushed)."""
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def flush_progress(self, requeue: bool = False) -> None:
        """Write the progress agents reported; ``requeue``: running stagings become queued."""
        self.records.flush(requeue=requeue)

    def live_progress(self) -> dict[int, dict[str, int]]:
        """Per running staging id, the counters its agent reported since the last flush."""
        return self.records.live()

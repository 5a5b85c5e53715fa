"""Running items submitted on the event loop through a worker thread in groups.

The node cache uses it for group commits and for links into job views: one thread hop and, for
commits, one flush per group instead of per item.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Generic, TypeVar

GROUP_MAX = 512  # items per group at most
_In = TypeVar("_In")
_Out = TypeVar("_Out")


class Batcher(Generic[_In, _Out]):
    """Runs items submitted on the event loop through ``run`` in worker threads, in groups.

    While a group is in a thread the next one accumulates, so the group size follows the rate
    by itself: one item when idle, hundreds under load, and one thread hop per group instead
    of one per item. Up to ``parallel`` groups run at once (the kernel's file work for one
    group does not wait for another's flush). ``run`` returns, per item, its result or its
    exception.
    """

    def __init__(
        self,
        run: Callable[[list[_In]], list[_Out | BaseException]],
        executor: concurrent.futures.Executor,
        parallel: int,
    ) -> None:
        self._run_group = run
        self._executor = executor
        self._parallel = parallel
        self._waiting: list[tuple[_In, asyncio.Future[_Out]]] = []
        # Runners counted when created and uncounted in their own last step, never in a done
        # callback: that runs later, and an item submitted in between would wait forever.
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()  # strong references only

    async def submit(self, item: _In) -> _Out:
        future: asyncio.Future[_Out] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._active < self._parallel:
            self._active += 1
            runner = asyncio.create_task(self._run(), name="cache-batch")
            self._tasks.add(runner)
            runner.add_done_callback(self._tasks.discard)
        return await future

    async def _run(self) -> None:
        try:
            await self._drain()
        finally:
            self._active -= 1  # no await between the empty check and here

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            group, self._waiting = self._waiting[:GROUP_MAX], self._waiting[GROUP_MAX:]
            try:
                # Shielded: a cancelled waiter must not stop a group half-way (a group
                # commit would leave written files unindexed until the next reconcile).
                results = await asyncio.shield(
                    loop.run_in_executor(
                        self._executor, self._run_group, [item for item, _ in group]
                    )
                )
            except BaseException as exc:  # only a bug or shutdown: run reports per item
                results = [exc] * len(group)
            for (_, future), result in zip(group, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

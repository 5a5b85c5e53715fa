"""What each node's cache holds, as the dashboard shows it: asked of the agents at most every
few seconds, never waited on for long.

Asking an agent for its usage walks its whole cache index (an lstat per object), and a node
may be down or its SSH session still opening: a page load must neither pay that each time nor
hang on one node. So each node has at most one question in flight (page loads share it), an
answer is reused for :data:`FRESH_SECONDS`, and a page waits at most :data:`WAIT_SECONDS` for
a new one before showing the last answer it has (with its age) or none yet. Throughput is
the growth of the agent's fetch counters (from the store and from peers) between answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hpcstage.errors import HpcstageError

FRESH_SECONDS = 15.0  # an answer this young is shown without asking again (it walks the index)
WAIT_SECONDS = 1.5  # a page waits this long for a node's answer, then shows what it has

Ask = Callable[[str], Awaitable[dict[str, Any]]]  # StagingService.cache_usage


@dataclass(frozen=True)
class Sample:
    """One answer from a node's agent, and when it came."""

    at: float  # time.monotonic()
    usage: dict[str, Any]  # UsageReply as a dict, plus "capacity"


def moved_bytes(usage: dict[str, Any]) -> int:
    """Bytes the agent has brought into its cache since it started (store and peers)."""
    stats = usage.get("stats", {})
    return int(stats.get("fetched_bytes", 0)) + int(stats.get("peer_bytes", 0))


def throughput(before: Sample | None, after: Sample) -> float | None:
    """Bytes per second into the cache between two answers; None without two comparable
    ones (the first answer, or an agent that restarted and counts from zero again)."""
    if before is None or after.at <= before.at:
        return None
    grown = moved_bytes(after.usage) - moved_bytes(before.usage)
    return grown / (after.at - before.at) if grown >= 0 else None


def node_row(
    node: str, last: Sample | None, rate: float | None, error: str, now: float
) -> dict[str, Any]:
    """The dashboard's line for one node: cache fill, throughput, how old, what went wrong."""
    usage = last.usage.get("usage", {}) if last else {}
    return {
        "node": node,
        "bytes": usage.get("bytes"),
        "capacity": last.usage.get("capacity") if last else None,
        "objects": usage.get("objects"),
        "leased_bytes": usage.get("leased_bytes"),
        "leased_objects": usage.get("leased_objects"),
        "bytes_per_s": rate,
        "age": round(now - last.at, 1) if last else None,
        "error": error,
    }


class NodeUsage:
    """Per node: the last two answers, the question in flight, and the last error."""

    def __init__(self, ask: Ask) -> None:
        self._ask = ask
        self._last: dict[str, Sample] = {}
        self._before: dict[str, Sample] = {}
        self._asking: dict[str, asyncio.Task[None]] = {}
        self._errors: dict[str, str] = {}

    async def rows(self, nodes: Iterable[str]) -> list[dict[str, Any]]:
        """One row per node, after waiting at most WAIT_SECONDS for the stale ones."""
        names = sorted(set(nodes))
        now = time.monotonic()
        tasks = [self._question(n) for n in names if self._stale(n, now)]
        if tasks:
            await asyncio.wait(tasks, timeout=WAIT_SECONDS)
        now = time.monotonic()
        return [self._row(n, now) for n in names]

    def _stale(self, node: str, now: float) -> bool:
        last = self._last.get(node)
        return last is None or now - last.at > FRESH_SECONDS

    def _question(self, node: str) -> asyncio.Task[None]:
        """The question to ``node`` in flight, asked now if there is none (one at a time)."""
        task = self._asking.get(node)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._answer(node))
            self._asking[node] = task
        return task

    async def _answer(self, node: str) -> None:
        try:
            usage = await self._ask(node)
        except (HpcstageError, OSError, TimeoutError) as exc:
            self._errors[node] = str(exc) or type(exc).__name__
            return
        if node in self._last:
            self._before[node] = self._last[node]
        self._last[node] = Sample(time.monotonic(), usage)
        self._errors[node] = ""

    def _row(self, node: str, now: float) -> dict[str, Any]:
        last = self._last.get(node)
        rate = throughput(self._before.get(node), last) if last else None
        return node_row(node, last, rate, self._errors.get(node, ""), now)

"""The dashboard's node caches (hpcstage.api.node_usage): asked rarely, never waited on long."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from hpcstage.api import node_usage
from hpcstage.api.node_usage import NodeUsage, Sample, throughput
from hpcstage.errors import HpcstageError


def usage(fetched: int, peer: int = 0, used: int = 100) -> dict[str, Any]:
    return {
        "usage": {"bytes": used, "objects": 2, "leased_bytes": 40, "leased_objects": 1},
        "stats": {"fetched_bytes": fetched, "peer_bytes": peer},
        "capacity": 1000,
    }


def test_throughput_is_the_growth_of_the_fetch_counters_between_answers() -> None:
    first = Sample(10.0, usage(1000))
    assert throughput(None, first) is None  # one answer: no rate yet
    assert throughput(first, Sample(12.0, usage(4000, peer=1000))) == 2000.0
    assert throughput(first, Sample(12.0, usage(10))) is None  # the agent restarted


def test_a_slow_node_does_not_hold_up_the_page_and_is_asked_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(node_usage, "WAIT_SECONDS", 0.05)
    asked: list[str] = []
    answer = asyncio.Event()

    async def ask(node: str) -> dict[str, Any]:
        asked.append(node)
        if node == "slow":
            await answer.wait()
        if node == "down":
            raise HpcstageError("no route to host")
        return usage(len(asked) * 100)

    async def scenario() -> None:
        nodes = NodeUsage(ask)
        began = time.monotonic()
        rows = {r["node"]: r for r in await nodes.rows(["fast", "slow", "down"])}
        assert time.monotonic() - began < 1
        assert (rows["fast"]["bytes"], rows["fast"]["capacity"], rows["fast"]["error"]) == (
            100,
            1000,
            "",
        )
        assert (rows["slow"]["bytes"], rows["slow"]["age"], rows["slow"]["error"]) == (
            None,
            None,
            "",
        )
        assert rows["down"]["error"] == "no route to host"
        again = {r["node"]: r for r in await nodes.rows(["fast", "slow"])}
        assert asked.count("slow") == 1  # still in flight: not asked twice
        assert asked.count("fast") == 1  # fresh: not asked again
        assert again["fast"]["leased_bytes"] == 40
        answer.set()
        await asyncio.sleep(0.01)
        later = await nodes.rows(["slow"])
        assert later[0]["bytes"] == 100 and later[0]["error"] == ""

    asyncio.run(scenario())


def test_an_answer_older_than_fresh_seconds_is_asked_again_and_gives_a_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(node_usage, "FRESH_SECONDS", 0.0)
    count = 0

    async def ask(node: str) -> dict[str, Any]:
        nonlocal count
        count += 1
        return usage(count * 1_000_000)

    async def scenario() -> None:
        nodes = NodeUsage(ask)
        assert (await nodes.rows(["n1"]))[0]["bytes_per_s"] is None
        await asyncio.sleep(0.05)
        rate = (await nodes.rows(["n1"]))[0]["bytes_per_s"]
        assert count == 2 and rate is not None and 1_000_000 < rate < 1_000_000 / 0.04

    asyncio.run(scenario())

"""An agent runs one ``drop_source`` at a time (agent/calls.py): the daemon gives up on a slow
eviction after a while, and the user may then ask again while the node's thread still walks
its index; a second walk beside it would only compete for the cache's lock."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from hpcstage.agent import calls
from hpcstage.agent.context import DEFAULT_TRANSFER, NodeContext
from hpcstage.cache import NodeCache
from hpcstage.errors import HpcstageError
from hpcstage.protocol.messages import (
    AgentCacheSettings,
    AgentStoreSettings,
    DropSourceRequest,
    HelloRequest,
    SourceSpec,
)


def test_a_second_eviction_while_one_runs_is_refused_then_allowed(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()
    source = SourceSpec.of("s3://data/set/")

    with NodeCache(tmp_path / "cache", boot="b") as cache:
        walk = cache.evict_source

        def slow_walk(*args: object) -> object:
            started.set()
            release.wait(30)
            return walk(*args)  # type: ignore[arg-type]

        cache.evict_source = slow_walk  # type: ignore[method-assign, assignment]
        ctx = NodeContext(node="n1", cache=cache)
        store = AgentStoreSettings(
            "http://127.0.0.1:9", "us-east-1", "path", True, "", 8, 1, 1, None
        )
        hello = HelloRequest(store, DEFAULT_TRANSFER, AgentCacheSettings(False), None)
        asyncio.run(calls.hello(ctx, hello))

        async def scenario() -> None:
            first = asyncio.create_task(calls.drop_source(ctx, DropSourceRequest(source)))
            await asyncio.to_thread(started.wait, 30)
            with pytest.raises(HpcstageError, match="still running on n1"):
                await calls.drop_source(ctx, DropSourceRequest(source))
            release.set()
            assert (await first).evicted == 0
            again = await calls.drop_source(ctx, DropSourceRequest(source))  # its turn ended
            assert again.in_use == 0

        asyncio.run(scenario())

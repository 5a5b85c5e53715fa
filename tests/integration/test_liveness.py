"""A node whose agent hangs is noticed within ``nodes.rpc_idle_timeout`` and handled like an
unreachable node (issue 18): today a stopped agent is a SIGSTOP away, tomorrow a hung disk."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster.cluster import DevCluster

from .staging import Stager, make_dataset, running_stager, small_files

pytestmark = pytest.mark.integration

IDLE = 4.0  # nodes.rpc_idle_timeout of this module's daemon


def _with_quick_liveness(text: str) -> str:
    assert text.count("[nodes]\n") == 1
    return text.replace(
        "[nodes]\n",
        f'[nodes]\nrpc_idle_timeout = "{IDLE:g}s"\nkeepalive_interval = "2s"\n'
        "keepalive_count_max = 3\n",
    )


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "liveness", edit=_with_quick_liveness)


def _agent_pids(dev: DevCluster, node: str) -> list[int]:
    """Pids of this cluster's agent for ``node`` (its argv names the node's cache dir, which
    is under this cluster's own base directory)."""
    cache_dir = str(Path(dev.info.base) / "nodes" / node / "cache")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # gone meanwhile
        mine = _after(argv, "--node") == node and _after(argv, "--cache-dir") == cache_dir
        if "agent" in argv and mine:
            found.append(int(entry.name))
    return found


def _after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else ""


def _warmup(stager: Stager, src: str, node: str) -> str:
    warm = stager.client.post("/api/v1/warmups", {"src": src, "nodes": [node]})["id"]
    return f"/api/v1/warmups/{warm}"


def _wait(stager: Stager, path: str, what: str, pred: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc: dict[str, Any] = stager.client.get(path)
        if pred(doc):
            return doc
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s: {doc}"
        time.sleep(0.2)


def test_a_stopped_agent_fails_its_call_in_time_and_its_node_is_retried(
    stager: Stager,
) -> None:
    first, _ = make_dataset(stager.dev, small_files(4, size=1024))
    stager.cli("alice", "warmup", first, "--nodes", "n2", "--json")  # a live session to n2
    (pid,) = _agent_pids(stager.dev, "n2")
    src, _ = make_dataset(stager.dev, small_files(8, size=1024))

    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        path = _warmup(stager, src, "n2")
        hung = "will retry: agent on n2: no answer for"
        doc = _wait(stager, path, "hang noticed", lambda d: hung in json.dumps(d["events"]), 30)
        noticed = time.monotonic() - start
    finally:
        os.kill(pid, signal.SIGCONT)
    # Within the idle timeout (plus the daemon's poll and the watchdog's step), not never.
    assert IDLE <= noticed < IDLE + 6, noticed
    events = json.dumps(doc["events"])
    assert f"(nodes.rpc_idle_timeout is {IDLE:g} s): the node or its agent hangs" in events

    # Unreachable, not failed: the staging is retried after the backoff, on a new session.
    done = _wait(
        stager,
        path,
        "staging after the agent resumed",
        lambda d: d["staging"].get("n2") in ("ready", "released", "failed"),
        120,
    )
    st = done["requests"][0]["nodes"]["n2"]
    assert done["staging"]["n2"] in ("ready", "released"), done
    assert st["files_done"] == 8, st

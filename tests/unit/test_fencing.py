"""Leader epochs: the pure rules (core/fencing.py), the node cache's record of them
(cache/fence.py), the commits they refuse, the agent that will not start, and the state
database that counts them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hpcstage.agent import calls
from hpcstage.agent.context import DEFAULT_CACHE, DEFAULT_TRANSFER, NodeContext
from hpcstage.agent.server import _handle
from hpcstage.cache import NodeCache, PendingObject
from hpcstage.cache.fence import EpochFence
from hpcstage.core import fencing
from hpcstage.core.fencing import Claim, Epoch
from hpcstage.core.identity import ObjectRef
from hpcstage.db import open_db, take_epoch
from hpcstage.errors import FencedError
from hpcstage.protocol.messages import AgentStoreSettings, HelloRequest

A, B = "a" * 32, "b" * 32  # two state databases' ids


def make_ref(key: str, data: bytes) -> ObjectRef:
    return ObjectRef(
        "https://s3.example",
        "bucket",
        key,
        hashlib.md5(data, usedforsecurity=False).hexdigest(),
        len(data),
    )


def write(pending: PendingObject, data: bytes) -> str:
    """Fill a pending object as a download would; its SHA-256."""
    os.write(pending.fd, data)
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("mine", "recorded", "expected"),
    [
        (Epoch(A, 1), None, Claim.RECORD),  # rule 4: nothing recorded yet
        (Epoch(A, 3), Epoch(A, 2), Claim.RECORD),  # rule 1: a newer term
        (Epoch(A, 2), Epoch(A, 2), Claim.KEEP),  # another agent of the same term
        (Epoch(A, 2), Epoch(A, 3), Claim.REFUSE),  # rule 1: a newer daemon is active
        (Epoch(A, 1), Epoch(B, 9), Claim.RECORD),  # rule 3: another database, the last wins
    ],
)
def test_claim(mine: Epoch, recorded: Epoch | None, expected: Claim) -> None:
    assert fencing.claim(mine, recorded) is expected


@pytest.mark.parametrize(
    ("mine", "recorded", "expected"),
    [
        (Epoch(A, 2), None, False),
        (Epoch(A, 2), Epoch(A, 1), False),
        (Epoch(A, 2), Epoch(A, 2), False),
        (Epoch(A, 2), Epoch(A, 3), True),
        (Epoch(A, 5), Epoch(B, 1), True),  # another database claimed the cache since
    ],
)
def test_superseded(mine: Epoch, recorded: Epoch | None, expected: bool) -> None:
    assert fencing.superseded(mine, recorded) is expected


def test_a_record_reads_back_and_a_damaged_one_is_an_error_not_no_epoch() -> None:
    text = fencing.record_text(Epoch(A, 7), "host pid 1", 1.5)
    assert fencing.parse_record(text) == Epoch(A, 7)
    assert fencing.parse_record("") is None
    for damaged in ["{", "[]", '{"state": "", "epoch": 1}', f'{{"state": "{A}", "epoch": 0}}']:
        with pytest.raises(ValueError, match=r"\S"):  # JSONDecodeError is a ValueError too
            fencing.parse_record(damaged)
    with pytest.raises(ValueError, match="no epoch number"):
        fencing.parse_record(f'{{"state": "{A}", "epoch": true}}')


def test_messages_name_both_epochs() -> None:
    said = fencing.superseded_message("/c", Epoch(A, 1), Epoch(A, 2))
    assert "epoch 1" in said and "epoch 2" in said and "writes nothing more" in said
    said = fencing.refused_message("/c", Epoch(A, 1), Epoch(A, 2))
    assert "a newer hpcstage daemon is active" in said


def test_a_newer_claim_supersedes_the_agent_of_the_older_one(tmp_path: Path) -> None:
    stops: list[FencedError] = []
    old = EpochFence(tmp_path, Epoch(A, 1), on_superseded=stops.append)
    assert old.claim("old") is Claim.RECORD
    old.check()  # its own record: fine
    new = EpochFence(tmp_path, Epoch(A, 2))
    assert new.claim("new") is Claim.RECORD
    assert '"epoch": 2' in (tmp_path / "epoch").read_text()
    with pytest.raises(FencedError, match=r"epoch 1 .* epoch 2 "):
        old.check()
    assert len(stops) == 1  # the agent was told, to exit
    with pytest.raises(FencedError, match="a newer hpcstage daemon is active"):
        EpochFence(tmp_path, Epoch(A, 1)).claim("late")
    assert EpochFence(tmp_path, Epoch(A, 2)).claim("again") is Claim.KEEP
    assert not list(tmp_path.glob("epoch.tmp-*"))  # written by rename, nothing left


def test_a_damaged_record_stops_the_agent_and_a_claim_repairs_it(tmp_path: Path) -> None:
    fence = EpochFence(tmp_path, Epoch(A, 1))
    fence.claim("one")
    (tmp_path / "epoch").write_text("garbage")
    with pytest.raises(FencedError, match="damaged"):
        fence.check()
    assert EpochFence(tmp_path, Epoch(A, 2)).claim("two") is Claim.RECORD


def test_a_superseded_agent_commits_nothing(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    old = EpochFence(root, Epoch(A, 1))
    old.claim("old")
    with NodeCache(root, guard=old.guard) as cache:
        data = b"x" * 100
        ref = make_ref("before", data)
        pending = cache.begin(ref)
        assert cache.commit(pending, write(pending, data)).exists()
        EpochFence(root, Epoch(A, 2)).claim("new")
        big = b"y" * (2 << 20)  # past the group commit: one object, its own commit
        small = b"z" * 10
        pending = cache.begin(make_ref("after", big))
        with pytest.raises(FencedError):
            cache.commit(pending, write(pending, big))
        assert not pending.path.exists() and not pending.final.exists()
        pending = cache.begin(make_ref("after-small", small))
        (result,) = cache.commit_group([(pending, write(pending, small))])
        assert isinstance(result, FencedError) and not pending.final.exists()
        assert cache.lookup(make_ref("after", big)) is None
        assert cache.lookup(ref) is not None  # what was committed before stays


def test_a_claim_waits_for_a_commit_under_way_and_none_starts_after_it(tmp_path: Path) -> None:
    old = EpochFence(tmp_path, Epoch(A, 1))
    old.claim("old")
    claimed = threading.Event()

    def claim_new() -> None:
        EpochFence(tmp_path, Epoch(A, 2)).claim("new")
        claimed.set()

    with old.guard():  # a commit between its check and its last row
        claimer = threading.Thread(target=claim_new)
        claimer.start()
        time.sleep(0.3)
        assert not claimed.is_set()  # the record stays until the commit is done
    claimer.join(10)
    assert claimed.is_set()
    with pytest.raises(FencedError), old.guard():
        pass  # the next commit is refused


def test_an_agent_of_an_older_epoch_does_not_start(tmp_path: Path) -> None:
    EpochFence(tmp_path, Epoch(A, 5)).claim("active")
    argv = [sys.executable, "-m", "hpcstage", "agent", "--node", "n1", "--cache-dir"]
    argv += [str(tmp_path), "--epoch", "4", "--state-id", A]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 4, done.stderr
    assert "a newer hpcstage daemon is active" in done.stderr
    assert not (tmp_path / "index.db").exists()  # stopped before it opened the cache


def test_each_leadership_term_gets_a_higher_epoch_of_the_same_database(tmp_path: Path) -> None:
    db = open_db(f"sqlite:///{tmp_path}/state.db")
    other = open_db(f"sqlite:///{tmp_path}/other.db")
    try:
        first, second = take_epoch(db, "one"), take_epoch(db, "two")
        assert (first.number, second.number) == (1, 2) and first.state == second.state
        assert take_epoch(other, "x").state != first.state  # each database its own id
    finally:  # Python 3.13 warns of sqlite connections left open (an error in the suite)
        db.kw["bind"].dispose()
        other.kw["bind"].dispose()


class _Writer:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.lines.append(json.loads(data))

    async def drain(self) -> None:
        return None


def test_a_call_to_a_superseded_agent_is_refused_and_never_runs(tmp_path: Path) -> None:
    ran: list[str] = []

    async def handler(params: dict[str, Any], progress: Any) -> dict[str, Any]:
        ran.append("stage")
        return {}

    old = EpochFence(tmp_path, Epoch(A, 1))
    old.claim("old")
    EpochFence(tmp_path, Epoch(A, 2)).claim("new")
    writer = _Writer()
    call = _handle({"id": 3, "op": "stage"}, {"stage": handler}, writer, old.check)  # type: ignore[arg-type]
    asyncio.run(call)
    (reply,) = writer.lines
    assert reply["event"] == "error" and not ran
    assert reply["message"].startswith("fenced: this agent serves the daemon of leader epoch 1")
    assert reply["transient"] is True  # a stale daemon must not fail the staging for it


def test_a_hello_of_another_epoch_than_the_agents_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    fence = EpochFence(root, Epoch(A, 2))
    fence.claim("mine")
    with NodeCache(root, guard=fence.guard) as cache:
        ctx = NodeContext(node="n1", cache=cache, fence=fence)
        store = AgentStoreSettings(
            "http://127.0.0.1:9", "us-east-1", "path", True, "", 8, 1, 1, None
        )
        request = HelloRequest(store, DEFAULT_TRANSFER, DEFAULT_CACHE, Epoch(A, 1))
        with pytest.raises(FencedError, match="hello from the daemon of leader epoch 1"):
            asyncio.run(calls.hello(ctx, request))

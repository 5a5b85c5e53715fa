"""``warmup --check`` and ``cache evict SRC`` on the daemon's side (staging/holdings.py), with
a fake store listing and fake agents: the counts, a node that cannot answer, the policy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hpcstage.config.load import parse_config
from hpcstage.core.identity import ObjectRef
from hpcstage.errors import DirectiveError, LimitError, ObjectMissingError, TransportError
from hpcstage.protocol.framing import ProgressFn
from hpcstage.staging import holdings
from hpcstage.staging.holdings import Holdings

STORE = "http://127.0.0.1:9000"


def ref(key: str, size: int) -> ObjectRef:
    return ObjectRef(STORE, "data", key, f"etag-{key}", size)


LISTED = [ref("set/a", 10), ref("set/b", 20), ref("set/c", 30)]


@dataclass
class FakeStore:
    refs: list[ObjectRef]

    async def list(self, prefix: str) -> AsyncIterator[ObjectRef]:
        for r in self.refs:
            if r.key.startswith(prefix):
                yield r

    async def head(self, key: str, *, version_id: str = "") -> ObjectRef:
        assert not version_id
        for r in self.refs:
            if r.key == key:
                return r
        raise ObjectMissingError(f"no object {key}")


@dataclass
class FakeAgent:
    """An agent's session: answers peer_want from the ids it holds, drop_source from a table."""

    held: set[str]
    calls: list[str] = field(default_factory=list)

    async def call(
        self, op: str, params: dict[str, Any], on_progress: ProgressFn | None = None
    ) -> dict[str, Any]:
        self.calls.append(op)
        if op == "peer_want":
            return {"want": [i for i in params["ids"] if i not in self.held]}
        assert op == "drop_source" and params["source"]["key"] == "set/"
        return {"evicted": 2, "evicted_bytes": 30, "in_use": 1, "in_use_bytes": 30}


@dataclass
class FakeNodes:
    agents: dict[str, FakeAgent]

    async def agent(self, node: str) -> FakeAgent:
        if node not in self.agents:
            raise TransportError(f"ssh {node}: connection refused")
        return self.agents[node]


@pytest.fixture
def audit() -> list[tuple[str, dict[str, Any]]]:
    return []


def make(
    tmp_path: Path, agents: dict[str, FakeAgent], audit: list[Any], more: str = ""
) -> Holdings:
    settings = parse_config(f"""
[site]
name = "t"
state_dir = "{tmp_path}"
[store]
endpoint_url = "{STORE}"
[[policy.rules]]
users = ["alice"]
read = ["s3://data/set/"]
{more}""")

    @contextlib.asynccontextmanager
    async def stores(bucket: str) -> AsyncIterator[FakeStore]:
        assert bucket == "data"
        yield FakeStore(LISTED)

    def record(event: str, **fields: Any) -> None:
        audit.append((event, fields))

    return Holdings(settings, FakeNodes(agents), stores, record)  # type: ignore[arg-type]


def test_each_node_counts_what_it_holds_of_the_current_objects(
    tmp_path: Path, audit: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(holdings, "CHECK_BATCH", 2)  # two batches: counts add up over them
    stale = ObjectRef(STORE, "data", "set/c", "an-older-etag", 30).cache_id
    agents = {
        "n1": FakeAgent({r.cache_id for r in LISTED}),
        "n2": FakeAgent({LISTED[1].cache_id, stale}),  # an old version of set/c: missing
    }
    doc = asyncio.run(
        make(tmp_path, agents, audit).check("s3://data/set/", ["n1", "n2", "n3"], "alice", False)
    )
    assert (doc["objects"], doc["bytes"]) == (3, 60)
    assert doc["nodes"]["n1"] == {"objects": 3, "bytes": 60, "percent": 100.0}
    assert doc["nodes"]["n2"] == {"objects": 1, "bytes": 20, "percent": 33.3}
    assert doc["nodes"]["n3"] == {
        "error": "cannot reach the agent on n3: ssh n3: connection refused"
    }
    # Over the three nodes asked, the unreachable one counting as holding nothing.
    assert doc["total"] == {"objects": 4, "bytes": 80, "percent": 44.4}
    assert agents["n1"].calls == ["peer_want", "peer_want"]


def test_a_single_object_is_checked_by_its_head(tmp_path: Path, audit: list[Any]) -> None:
    agents = {"n1": FakeAgent({LISTED[0].cache_id})}
    doc = asyncio.run(make(tmp_path, agents, audit).check("s3://data/set/a", ["n1"], "root", True))
    assert doc["nodes"]["n1"]["percent"] == 100.0 and doc["objects"] == 1


def test_an_empty_prefix_is_an_error_not_zero_percent(tmp_path: Path, audit: list[Any]) -> None:
    with pytest.raises(ObjectMissingError, match="no objects under s3://data/set/none/"):
        asyncio.run(make(tmp_path, {}, audit).check("s3://data/set/none/", ["n1"], "alice", False))


@pytest.mark.parametrize("verb", ["check", "evict"])
def test_a_user_the_policy_does_not_let_read_src_is_refused_and_audited(
    tmp_path: Path, audit: list[Any], verb: str
) -> None:
    agents = {"n1": FakeAgent(set())}
    action = getattr(make(tmp_path, agents, audit), verb)
    with pytest.raises(
        PermissionError,
        match=f"cache {verb} of s3://data/set/ refused: no policy rule grants user bob",
    ):
        asyncio.run(action("s3://data/set/", ["n1"], "bob", False))
    assert agents["n1"].calls == []  # no node was asked anything
    assert audit[0][0] == "refused" and audit[0][1]["user"] == "bob"
    asyncio.run(action("s3://data/set/", ["n1"], "bob", True))  # an admin may


@pytest.mark.parametrize("src", ["/shared/data/", "s3://data/set/x.hpack/", "data/set/"])
def test_only_s3_objects_and_prefixes(tmp_path: Path, audit: list[Any], src: str) -> None:
    with pytest.raises(DirectiveError):
        asyncio.run(make(tmp_path, {}, audit).check(src, ["n1"], "root", True))


def test_evicting_sums_the_nodes_and_is_audited(tmp_path: Path, audit: list[Any]) -> None:
    agents = {"n1": FakeAgent(set()), "n2": FakeAgent(set())}
    doc = asyncio.run(
        make(tmp_path, agents, audit).evict("s3://data/set/", ["n1", "n2", "n9"], "alice", False)
    )
    assert doc["nodes"]["n1"] == {
        "evicted": 2,
        "evicted_bytes": 30,
        "in_use": 1,
        "in_use_bytes": 30,
    }
    assert doc["nodes"]["n9"] == {"error": "cannot evict on n9: ssh n9: connection refused"}
    assert doc["total"] == {"evicted": 4, "evicted_bytes": 60, "in_use": 2, "in_use_bytes": 60}
    assert audit == [
        (
            "cache-evict",
            {"user": "alice", "src": "s3://data/set/", "nodes": ["n1", "n2", "n9"], **doc["total"]},
        )
    ]


def test_a_reader_asking_too_often_is_refused_and_audited_an_admin_is_not(
    tmp_path: Path, audit: list[Any]
) -> None:
    agents = {"n1": FakeAgent({r.cache_id for r in LISTED})}
    found = make(tmp_path, agents, audit, "[limits]\ncache_requests_per_minute = 2")

    async def scenario() -> None:
        await found.check("s3://data/set/", ["n1"], "alice", False)
        await found.evict("s3://data/set/", ["n1"], "alice", False)  # checks and evicts count
        with pytest.raises(LimitError, match=r"limits\.cache_requests_per_minute is 2"):
            await found.check("s3://data/set/", ["n1"], "alice", False)
        await found.check("s3://data/set/", ["n1"], "root", True)  # admins: no limit

    asyncio.run(scenario())
    assert [e for e, f in audit if e == "refused"] == ["refused"]


def test_a_reader_gets_one_check_or_evict_at_a_time(tmp_path: Path, audit: list[Any]) -> None:
    release = asyncio.Event()

    @dataclass
    class SlowAgent(FakeAgent):
        async def call(
            self, op: str, params: dict[str, Any], on_progress: ProgressFn | None = None
        ) -> dict[str, Any]:
            await release.wait()
            return await super().call(op, params, on_progress)

    found = make(tmp_path, {"n1": SlowAgent(set())}, audit)

    async def scenario() -> None:
        first = asyncio.create_task(found.evict("s3://data/set/", ["n1"], "alice", False))
        await asyncio.sleep(0.05)
        with pytest.raises(LimitError, match="still running"):
            await found.check("s3://data/set/", ["n1"], "alice", False)
        release.set()
        await first
        await found.check("s3://data/set/", ["n1"], "alice", False)  # its turn is over

    asyncio.run(scenario())


def test_a_filtered_prefix_is_checked_for_the_objects_its_globs_take(
    tmp_path: Path, audit: list[Any]
) -> None:
    agents = {"n1": FakeAgent({LISTED[0].cache_id})}
    found = make(tmp_path, agents, audit)
    doc = asyncio.run(found.check("s3://data/set/::exclude=c", ["n1"], "alice", False))
    assert (doc["objects"], doc["bytes"]) == (2, 30)  # set/c is left out
    assert doc["nodes"]["n1"] == {"objects": 1, "bytes": 10, "percent": 33.3}


@pytest.mark.parametrize("src", ["s3://data/set/::include=a", "s3://data/set/a?versionId=v1"])
def test_an_evict_narrower_than_an_object_or_prefix_is_refused(
    tmp_path: Path, audit: list[Any], src: str
) -> None:
    agents = {"n1": FakeAgent(set())}
    with pytest.raises(DirectiveError, match="without include/exclude globs or"):
        asyncio.run(make(tmp_path, agents, audit).evict(src, ["n1"], "alice", False))
    assert agents["n1"].calls == []


def test_a_reader_checks_at_most_as_many_objects_as_a_stage_in_lists(
    tmp_path: Path, audit: list[Any]
) -> None:
    agents = {"n1": FakeAgent(set())}
    found = make(tmp_path, agents, audit, "[limits]\nstage_in_objects = 2")
    with pytest.raises(DirectiveError, match="more than 2 objects"):
        asyncio.run(found.check("s3://data/set/", ["n1"], "alice", False))
    doc = asyncio.run(found.check("s3://data/set/", ["n1"], "root", True))  # admins: no limit
    assert doc["objects"] == 3


def test_policy_refusals_count_against_the_rate_too(tmp_path: Path, audit: list[Any]) -> None:
    found = make(tmp_path, {}, audit, "[limits]\ncache_requests_per_minute = 1")
    with pytest.raises(PermissionError):
        asyncio.run(found.check("s3://data/set/", ["n1"], "bob", False))
    with pytest.raises(LimitError):  # not another policy check and audit line
        asyncio.run(found.check("s3://data/set/", ["n1"], "bob", False))

"""The agent protocol's messages: strict decoding, and every message the daemon builds is
exactly the one the agent decodes (issue 16: the agent read a "cache" flag in stage_out
that the daemon never sent, and tested for a source kind "s3-key" no parser makes)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.agent.context import NodeContext
from hpcstage.agent.server import routes
from hpcstage.cache import NodeCache
from hpcstage.config.load import parse_config
from hpcstage.core import limits, quota
from hpcstage.core.directives import SourceKind
from hpcstage.core.rules import OutputFlags, StagingItem
from hpcstage.db import open_db
from hpcstage.db.models import Job, Request, Staging
from hpcstage.errors import ProtocolError
from hpcstage.protocol import messages as m
from hpcstage.protocol.framing import ProgressFn
from hpcstage.protocol.wire import from_wire, to_wire
from hpcstage.staging.access import StoreAccess
from hpcstage.staging.agents import AgentClient
from hpcstage.staging.caches import NodeCaches
from hpcstage.staging.nodes import NodeAgents
from hpcstage.staging.records import StagingRecords
from hpcstage.staging.stagein import StageIn
from hpcstage.staging.stageout import StageOut

NODE = "n1"
CALLS = {rpc.op: rpc for rpc in m.CALLS}


def _message_types(cls: type[Any]) -> Iterator[type[Any]]:
    """``cls`` and every message type nested in its fields."""
    yield cls
    for hint in typing.get_type_hints(cls).values():
        for part in (hint, *typing.get_args(hint)):
            if isinstance(part, type) and dataclasses.is_dataclass(part):
                yield from _message_types(part)


@pytest.mark.parametrize("rpc", m.CALLS, ids=lambda rpc: rpc.op)
def test_no_request_field_has_a_default_the_daemon_could_leave_unsent(rpc: m.Rpc[Any, Any]) -> None:
    # With strict decoding this means: the agent can read no field the daemon does not send.
    for cls in _message_types(rpc.request):
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING, f"{cls.__name__}.{f.name}"
            assert f.default_factory is dataclasses.MISSING, f"{cls.__name__}.{f.name}"


def test_the_agent_answers_every_call_and_no_other(tmp_path: Path) -> None:
    with NodeCache(tmp_path / "cache") as cache:
        assert set(routes(NodeContext(NODE, cache))) == set(CALLS)
    clients = {n for n, v in vars(AgentClient).items() if callable(v) and not n.startswith("_")}
    assert clients == set(CALLS)


def stage_item(**over: Any) -> dict[str, Any]:
    item = {
        "request_id": 1,
        "source": {
            "kind": "s3-object",
            "bucket": "data",
            "key": "k",
            "path": "",
            "include": [],
            "exclude": [],
            "version_id": "",
        },
        "dest": "k",
        "max_bytes": None,
        "quota_reason": "",
        "max_objects": 5,
        "objects_reason": "a limit",
    }
    return {**item, **over}


NO_RATES = {"download": 0, "upload": 0, "requests": 0.0, "generation": 0}


def test_a_well_formed_request_decodes_to_its_type() -> None:
    got = from_wire(
        m.StageRequest,
        {"job": "7", "user": "u", "view": True, "items": [stage_item()], "rates": NO_RATES},
    )
    assert got.items[0].source.kind is SourceKind.S3_OBJECT
    assert got.items[0].max_bytes is None and got.items[0].max_objects == 5


@pytest.mark.parametrize(
    ("item", "complaint"),
    [
        ({**stage_item(), "cache": True}, "unknown field(s) cache"),
        ({k: v for k, v in stage_item().items() if k != "dest"}, "missing field dest"),
        (stage_item(request_id="1"), "request_id: expected int, got str"),
        (stage_item(request_id=True), "request_id: expected int, got bool"),
        (stage_item(max_objects=1.5), "max_objects: expected int, got float"),
        (stage_item(source={**stage_item()["source"], "kind": "s3-key"}), "'s3-key' is none of"),
        (stage_item(source="s3://data/k"), "source: expected an object, got str"),
    ],
)
def test_decoding_is_strict_and_names_the_field(item: dict[str, Any], complaint: str) -> None:
    params = {"job": "7", "user": "u", "view": True, "items": [item], "rates": NO_RATES}
    with pytest.raises(ProtocolError, match=r"StageRequest\.items\[0\]") as caught:
        from_wire(m.StageRequest, params)
    assert complaint in str(caught.value)


def test_a_float_field_takes_a_json_integer() -> None:
    got = from_wire(m.PingReply, {"node": "n1", "time": 3})
    assert got.time == 3.0 and isinstance(got.time, float)


def test_the_parsers_single_object_kind_is_what_the_agent_decodes() -> None:
    source = m.SourceSpec.of("s3://data/dir/file.bin")
    assert source.kind is SourceKind.S3_OBJECT
    assert from_wire(m.SourceSpec, json.loads(json.dumps(to_wire(source)))) == source


# -- every message the daemon builds, as the agent decodes it ---------------------------------


@dataclasses.dataclass
class Recorder:
    """An agent session that records each call's params and answers with a canned reply."""

    replies: dict[str, Any]
    name: str = NODE
    sent: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)

    async def call(
        self, op: str, params: dict[str, Any], on_progress: ProgressFn | None = None
    ) -> dict[str, Any]:
        self.sent.append((op, json.loads(json.dumps(params))))
        reply: dict[str, Any] = to_wire(self.replies[op])
        return reply


REPLIES: dict[str, Any] = {
    "hello": m.HelloReply(NODE, 1, {}, {}),
    "evict": m.EvictReply(3, 4096, 2, 1, 0, 1700000000.0),
    "usage": m.UsageReply({}, {}, [], []),
    "stage": m.StageReply("", False, [m.StageProgress(1, 1, 3, 1, 3, 1, 3)]),
    "stage_out": m.StageOutReply([m.StageOutResult(1, 1, 3, 1)]),
    "release": m.ReleaseReply("7", ""),
}


@dataclasses.dataclass
class Parts:
    """The daemon's parts that send messages to agents, over one recorded session."""

    nodes: NodeAgents
    caches: NodeCaches
    stage_in: StageIn
    stage_out: StageOut
    db: sessionmaker[Session]


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    text = (Path(__file__).resolve().parents[2] / "examples" / "site.toml").read_text()
    text = text.replace('state_dir = "/var/lib/hpcstage"', f'state_dir = "{tmp_path}"')
    settings = parse_config(text)
    db = open_db(f"sqlite:///{tmp_path}/state.db")
    nodes = NodeAgents(settings, None, StoreAccess())  # type: ignore[arg-type]  # no Slurm asked
    records = StagingRecords(db)
    yield Parts(
        nodes,
        NodeCaches(settings, nodes),
        StageIn(settings, db, nodes, records),
        StageOut(settings, db, nodes, records),
        db,
    )
    db.kw["bind"].dispose()  # Python 3.13 warns of sqlite connections left open


def _staging(db: sessionmaker[Session], direction: str, src: str, dest: str) -> tuple[int, int]:
    """A finished job with one request and its staging on NODE: (request id, staging id)."""
    with db.begin() as session:
        slurm_id = 7 if direction == "in" else 8
        job = Job(slurm_job_id=slurm_id, user="bob", state="COMPLETED", batch_host=NODE)
        request = Request(direction=direction, src=src, dest=dest)
        job.requests.append(request)
        staging = Staging(node=NODE, state="running")
        request.stagings.append(staging)
        session.add(job)
        session.flush()
        return request.id, staging.id


def _sent_by(parts: Parts, session: Recorder) -> list[tuple[str, dict[str, Any]]]:
    async def agent(_node: str) -> Recorder:
        return session

    parts.nodes.agent = agent  # type: ignore[assignment,method-assign]

    async def run() -> None:
        await parts.nodes._hello(NODE, session)  # type: ignore[arg-type]
        await parts.caches.evict_node(NODE)
        await parts.caches.usage(NODE)

    asyncio.run(run())
    return session.sent


def test_every_message_the_daemon_builds_decodes_to_exactly_itself(parts: Parts) -> None:
    session = Recorder(REPLIES)
    sent = _sent_by(parts, session)
    request_id, staging_id = _staging(parts.db, "in", "s3://data/dir/file.bin", "file.bin")
    call = m.StageRequest("7", "bob", view=True, items=[], rates=m.NO_LIMITS)
    budget = quota.Budget(None, "no quota")
    objects = limits.ObjectBudget(10, "a limit")
    asyncio.run(
        parts.stage_in._stage_one(
            session,  # type: ignore[arg-type]
            staging_id,
            call,
            request_id,
            "s3://data/dir/file.bin",
            "file.bin",
            budget,
            objects,
        )
    )
    request_id, staging_id = _staging(parts.db, "out", "out", "s3://results/x/")
    flags = OutputFlags(
        "bob", optional=False, job_completed=True, limit=limits.OutputLimit(None, None, "")
    )
    item = StagingItem(staging_id, request_id, "out", "s3://results/x/", "--stage-out=out:...", 3)
    asyncio.run(parts.stage_out._out_one(session, item, "7", 1.0, flags))  # type: ignore[arg-type]

    assert [op for op, _ in sent] == ["hello", "evict", "usage", "stage", "stage_out"]
    for op, params in sent:
        decoded = from_wire(CALLS[op].request, params)  # what the agent's routing does first
        assert to_wire(decoded) == params, op

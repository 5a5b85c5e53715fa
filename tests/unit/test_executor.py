"""The executor's actions without a cluster: an in-memory SQLite state and fake node agents.

Each test writes a job into the state, has the executor run one planned action against a fake
agent pool (canned replies, or TransportError/AgentError), and reads back what the action left
in the database: staging states, progress columns, per-file outcomes, errors and events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.config.load import parse_config
from hpcstage.config.schema import Settings
from hpcstage.core import plan as planner
from hpcstage.db import open_db
from hpcstage.db.models import Event, Job, Request, Staging, Upload
from hpcstage.errors import AgentError, TransportError
from hpcstage.protocol.framing import RpcClient
from hpcstage.protocol.messages import (
    FileOutcome,
    PeerListReply,
    PeerObject,
    PeerPutReply,
    PeerServeReply,
    PeerWantReply,
    ReleaseReply,
    StageOutProgress,
    StageOutReply,
    StageOutResult,
    StageProgress,
    StageReply,
)
from hpcstage.protocol.wire import to_wire
from hpcstage.staging.executor import Executor
from hpcstage.staging.records import MAX_INTERNAL_ERROR_ATTEMPTS, ready_where_running
from hpcstage.staging.stagein import MAX_TRANSPORT_ATTEMPTS

NODE = "n1"


@dataclass
class Reply:
    """What a fake agent answers to one call: progress reports first, then the result."""

    result: Any  # a reply message of hpcstage.protocol.messages
    progress: list[Any] = field(default_factory=list)  # its progress messages


class FakeAgent:
    """An agent session answering each call with the next scripted reply (or raising it),
    sent as the real session would: the messages' JSON values, which the daemon's side
    decodes strictly."""

    name = NODE

    def __init__(self, *script: Reply | BaseException | asyncio.Event) -> None:
        self.script = list(script)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(
        self,
        op: str,
        params: dict[str, Any],
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        self.calls.append((op, params))
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, asyncio.Event):  # a call that runs until cancelled
            if on_progress is not None:
                on_progress(to_wire(StageProgress(1, 1, 10, 4, None, 0, 0)))
            await step.wait()
            raise AssertionError("a call waiting for its cancellation returned")
        for report in step.progress:
            assert on_progress is not None
            on_progress(to_wire(report))
        reply: dict[str, Any] = to_wire(step.result)
        return reply


class FakeNodes:
    """The node sessions' interface (``staging.nodes.NodePool``) over fake agents."""

    def __init__(self, **agents: FakeAgent) -> None:
        self.agents = agents
        self.unreachable: set[str] = set()
        self.failed: list[str] = []
        self.asleep: set[str] = set()  # powered down by Slurm power saving

    async def agent(self, node: str) -> RpcClient:
        if node in self.unreachable:
            raise TransportError(f"cannot reach {node}")
        return cast(RpcClient, self.agents[node])

    def node_failed(self, node: str) -> None:
        self.failed.append(node)

    def backing_off(self, node: str) -> bool:
        return node in self.failed

    def known_nodes(self) -> list[str]:
        return sorted(self.agents)

    def powered_down(self, node: str) -> bool:
        return node in self.asleep

    def peer_address(self, node: str) -> str:
        return "127.0.0.1"


@pytest.fixture
def settings() -> Settings:
    return parse_config(
        '[site]\nname = "t"\nstate_dir = "/nonexistent"\n'
        '[store]\nendpoint_url = "http://127.0.0.1:9"\n'
    )


@pytest.fixture
def db() -> Iterator[sessionmaker[Session]]:
    found = open_db("sqlite://")  # in memory: one connection per thread, and one thread here
    yield found
    found.kw["bind"].dispose()


def _job(
    db: sessionmaker[Session],
    *requests: Request,
    state: str = "RUNNING",
    nodes: str = NODE,
    slurm_id: int = 7,
) -> int:
    with db.begin() as session:
        job = Job(slurm_job_id=slurm_id, user="bob", account="lab", state=state, batch_host=NODE)
        job.nodes = nodes if state == "RUNNING" else ""
        job.planned_nodes = "" if state == "RUNNING" else nodes
        job.requests.extend(requests)
        session.add(job)
        session.flush()
        return job.id


def _in(n: int) -> Request:
    src = f"s3://data/set{n}/"
    return Request(
        direction="in", position=n, src=src, dest=f"set{n}", line=n, text=f"--stage-in={src}"
    )


def _out(n: int, **more: Any) -> Request:
    dest = f"s3://results/run{n}/"
    text = f"--stage-out=out{n}:{dest}"
    return Request(direction="out", position=n, src=f"out{n}", dest=dest, text=text, **more)


def _run(executor: Executor, action: planner.Action) -> None:
    """Start ``action`` and wait until its task has ended (done callback included)."""

    async def go() -> None:
        executor.act(action)
        while executor.tasks:
            await asyncio.gather(*executor.tasks.values(), return_exceptions=True)
            await asyncio.sleep(0)

    asyncio.run(go())


def _stagings(db: sessionmaker[Session]) -> list[Staging]:
    with db.begin() as session:
        return list(session.query(Staging).order_by(Staging.id))


def _events(db: sessionmaker[Session]) -> list[str]:
    with db.begin() as session:
        return [e.message for e in session.query(Event).order_by(Event.id)]


def _stage(job_id: int) -> planner.Stage:
    return planner.Stage((0, 0.0, 0), job_id, NODE, "test")


# ---------------------------------------------------------------------------- stage-in


def test_a_stage_in_that_succeeds_leaves_its_stagings_ready_with_their_counters(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1), _in(2))
    agent = FakeAgent(
        Reply(
            StageReply("", False, [StageProgress(1, 3, 300, 3, 300, 2, 200)]),
            progress=[StageProgress(1, 1, 9, None, None, 0, 0)],
        ),
        Reply(StageReply("", False, [StageProgress(2, 1, 5, None, None, 1, 5)])),
    )
    executor = Executor(settings, db, FakeNodes(n1=agent))
    _run(executor, _stage(job_id))
    first, second = _stagings(db)
    assert (first.state, first.files_done, first.bytes_done, first.fetched_files) == (
        "ready",
        3,
        300,
        2,
    )
    assert (first.files_total, first.bytes_total, first.attempts) == (3, 300, 0)
    assert (second.state, second.bytes_done, second.files_total) == ("ready", 5, None)
    assert [op for op, _ in agent.calls] == ["stage", "stage"]
    params = agent.calls[0][1]
    assert (params["job"], params["user"], params["view"]) == ("7", "bob", True)
    assert params["items"][0]["source"]["bucket"] == "data"
    assert "ready: s3://data/set1/ -> set1 (3 files, 300 bytes, 2 fetched)" in _events(db)
    assert executor.live_progress() == {}


def test_a_stage_in_whose_node_cannot_be_reached_is_requeued_and_the_node_backs_off(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1))
    nodes = FakeNodes(n1=FakeAgent())
    nodes.unreachable.add(NODE)
    executor = Executor(settings, db, nodes)
    _run(executor, _stage(job_id))
    (st,) = _stagings(db)
    assert (st.state, st.attempts) == ("queued", 1)
    assert st.error == f"node {NODE} unreachable: cannot reach {NODE}"
    assert nodes.failed == [NODE]
    _run(executor, _stage(job_id))  # backing off: no new attempt
    assert _stagings(db)[0].attempts == 1


def test_a_stage_in_that_the_store_throttles_is_requeued_with_what_it_did(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1), _in(2))
    agent = FakeAgent(Reply(StageReply("", False, [StageProgress(1, 1, 1, None, None, 0, 0)])))
    agent.script.append(AgentError("SlowDown", transient=True))
    executor = Executor(settings, db, FakeNodes(n1=agent))
    _run(executor, _stage(job_id))
    first, second = _stagings(db)
    assert first.state == "ready"
    assert (second.state, second.error) == ("queued", f"node {NODE} unreachable: SlowDown")
    assert _events(db)[-1] == "will retry: SlowDown"


def test_a_stage_in_fails_after_its_last_transport_attempt(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1))
    for _ in range(MAX_TRANSPORT_ATTEMPTS):
        nodes = FakeNodes(n1=FakeAgent(TransportError("session closed")))
        _run(Executor(settings, db, nodes), _stage(job_id))
    (st,) = _stagings(db)
    assert (st.state, st.attempts) == ("failed", MAX_TRANSPORT_ATTEMPTS)


def test_a_stage_in_the_agent_refuses_fails_with_its_message_and_stops_the_others(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1), _in(2))
    agent = FakeAgent(AgentError("no such bucket"))
    executor = Executor(settings, db, FakeNodes(n1=agent))
    _run(executor, _stage(job_id))
    first, second = _stagings(db)
    assert (first.state, first.error) == (
        "failed",
        "line 1: --stage-in=s3://data/set1/: no such bucket",
    )
    assert (second.state, second.error) == ("failed", "not staged: another input failed")
    assert _events(db)[-1] == f"failed: {first.error}"


def test_a_node_failure_before_the_job_runs_there_drops_the_node_not_the_job(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1), _in(2), state="PENDING")
    agent = FakeAgent(AgentError("No space left on device", node_only=True))
    _run(Executor(settings, db, FakeNodes(n1=agent)), _stage(job_id))
    first, second = _stagings(db)
    assert (first.state, second.state) == ("dropped", "dropped")
    assert first.error == "on n1: line 1: --stage-in=s3://data/set1/: No space left on device"
    assert _events(db)[-1].startswith("n1 dropped from the job's nodes: on n1: ")


def test_a_node_failure_where_the_job_runs_fails_the_job_naming_the_node(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1), state="RUNNING", nodes=NODE)
    agent = FakeAgent(AgentError("No space left on device", node_only=True))
    _run(Executor(settings, db, FakeNodes(n1=agent)), _stage(job_id))
    (st,) = _stagings(db)
    assert st.state == "failed"
    assert st.error.startswith("on n1: ")


def test_a_data_failure_fails_a_pending_job_too(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1), state="PENDING")
    _run(Executor(settings, db, FakeNodes(n1=FakeAgent(AgentError("no such key")))), _stage(job_id))
    assert _stagings(db)[0].state == "failed"


def test_a_node_out_of_reach_for_good_is_dropped_from_a_pending_job(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1), state="PENDING")
    for _ in range(MAX_TRANSPORT_ATTEMPTS):
        nodes = FakeNodes(n1=FakeAgent(TransportError("session closed")))
        _run(Executor(settings, db, nodes), _stage(job_id))
    (st,) = _stagings(db)
    assert (st.state, st.attempts) == ("dropped", MAX_TRANSPORT_ATTEMPTS)


def test_a_node_powered_down_meanwhile_is_not_dropped_however_often_it_fails(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    """Slurm power saving switched the node off during the stage: the plan stages it again
    once it is up, so its failures are not counted against it."""
    job_id = _job(db, _in(1), state="PENDING")
    for _ in range(MAX_TRANSPORT_ATTEMPTS + 2):
        nodes = FakeNodes(n1=FakeAgent(TransportError("session closed")))
        nodes.asleep.add("n1")
        _run(Executor(settings, db, nodes), _stage(job_id))
        assert nodes.failed == []  # no backoff either: it is staged as soon as it is up
    (st,) = _stagings(db)
    assert (st.state, st.attempts) == ("queued", 0)
    assert "unreachable" in st.error


def test_a_view_on_a_node_that_powered_down_is_queued_again_without_reaching_the_node(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1), _out(2), state="PENDING")
    ready = FakeAgent(Reply(StageReply("", False, [StageProgress(1, 1, 9, 1, 9, 1, 9)])))
    _run(Executor(settings, db, FakeNodes(n1=ready)), _stage(job_id))
    with db.begin() as session:  # an output's staging there (a stage-out) is left alone
        out = session.query(Request).filter_by(direction="out").one()
        session.add(Staging(request_id=out.id, node=NODE, state="ready"))
    assert [st.state for st in _stagings(db)] == ["ready", "ready"]
    nodes = FakeNodes()  # no agent at all: the node is off
    nodes.unreachable.add(NODE)
    _run(Executor(settings, db, nodes), planner.Restage(job_id, NODE, "n1 powered down: again"))
    assert [(st.state, st.attempts) for st in _stagings(db)] == [("queued", 0), ("ready", 0)]
    assert _events(db)[-1] == "n1 powered down: again" and nodes.failed == []


# ---------------------------------------------------------------------------- stage-out


def test_a_stage_out_that_succeeds_records_every_file(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _out(1, optional=True), state="COMPLETED")
    uploaded = FileOutcome("out1/a", "run1/a", 4, "done", error="", trash_key="")
    report = StageOutProgress(1, [uploaded], 1, 4, files_total=1, bytes_total=4, fetched=1)
    agent = FakeAgent(Reply(StageOutReply([StageOutResult(1, 1, 4, 1)]), progress=[report]))
    executor = Executor(settings, db, FakeNodes(n1=agent))
    _run(executor, planner.StageOut(job_id, NODE, "ended"))
    (st,) = _stagings(db)
    assert (st.state, st.files_done, st.bytes_done, st.fetched_files) == ("ready", 1, 4, 1)
    ((op, params),) = agent.calls
    item = params["items"][0]
    assert (op, params["job"], params["user"]) == ("stage_out", "7", "bob")
    assert (item["dest_bucket"], item["dest_key"], item["src"]) == ("results", "run1/", "out1")
    assert (item["optional"], item["job_completed"]) == (True, True)
    with db.begin() as session:
        row = session.query(Upload).one()
        assert (row.path, row.key, row.size, row.state) == ("out1/a", "run1/a", 4, "done")


def test_a_stage_out_the_agent_refuses_fails_and_the_next_directive_waits(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _out(1), _out(2), state="FAILED")
    agent = FakeAgent(AgentError("out1: no such file"))
    executor = Executor(settings, db, FakeNodes(n1=agent))
    _run(executor, planner.StageOut(job_id, NODE, "ended"))
    first, second = _stagings(db)
    assert first.state == "failed"
    assert first.error == "--stage-out=out1:s3://results/run1/: out1: no such file"
    assert (second.state, second.error) == ("queued", "will retry: after another failed")
    assert agent.calls[0][1]["items"][0]["job_completed"] is False


def test_a_stage_out_whose_store_is_down_is_requeued(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _out(1), state="COMPLETED")
    agent = FakeAgent(AgentError("store unavailable", transient=True))
    executor = Executor(settings, db, FakeNodes(n1=agent))
    _run(executor, planner.StageOut(job_id, NODE, "ended"))
    (st,) = _stagings(db)
    assert (st.state, st.error, st.attempts) == ("queued", "will retry: store unavailable", 1)


def test_a_stage_out_of_a_job_that_never_ran_is_skipped(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _out(1), state="CANCELLED")
    executor = Executor(settings, db, FakeNodes())
    _run(executor, planner.StageOut(job_id, "", "ended"))
    (st,) = _stagings(db)
    assert (st.state, st.error) == ("skipped", "the job never ran on a node: no outputs")


# ---------------------------------------------------------------------------- release


def test_a_release_ends_the_views_but_keeps_failures_and_outputs_on_record(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1), _in(2), _out(3), state="COMPLETED")
    with db.begin() as session:
        for request, state in zip(
            session.query(Request), ("ready", "failed", "ready"), strict=True
        ):
            request.stagings.append(Staging(node=NODE, state=state))
    agent = FakeAgent(Reply(ReleaseReply("7", "7-1")))
    executor = Executor(settings, db, FakeNodes(n1=agent))
    _run(executor, planner.Release(job_id, NODE, "job ended"))
    assert [st.state for st in _stagings(db)] == ["released", "failed", "ready"]
    assert agent.calls == [("release", {"job": "7"})]
    assert _events(db)[-1] == "view released: job ended (left for an admin: released/7-1)"
    _run(executor, planner.MarkReleased(job_id))
    with db.begin() as session:
        assert session.get_one(Job, job_id).released_at is not None


def test_a_release_that_fails_changes_nothing(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1), state="COMPLETED")
    with db.begin() as session:
        request = session.query(Request).one()
        request.stagings.append(Staging(node=NODE, state="ready"))
    executor = Executor(settings, db, FakeNodes(n1=FakeAgent(AgentError("busy"))))
    _run(executor, planner.Release(job_id, NODE, "job ended"))
    assert [st.state for st in _stagings(db)] == ["ready"]


# ---------------------------------------------------------------------------- recovery


def test_at_start_up_transfers_left_running_are_queued_again(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    _job(db, _in(1), _in(2), _in(3))
    with db.begin() as session:
        for request, state in zip(
            session.query(Request), ("running", "ready", "failed"), strict=True
        ):
            request.stagings.append(Staging(node=NODE, state=state, attempts=1))
    Executor(settings, db, FakeNodes()).recover()
    assert [st.state for st in _stagings(db)] == ["queued", "ready", "failed"]


def test_a_drained_transfer_is_left_queued_with_its_progress(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    """What the daemon's shutdown does: cancel the tasks, write progress, requeue."""
    job_id = _job(db, _in(1))
    executor = Executor(settings, db, FakeNodes(n1=FakeAgent(asyncio.Event())))

    async def go() -> None:
        executor.act(_stage(job_id))
        while not executor.live_progress():
            await asyncio.sleep(0)
        await executor.cancel()
        executor.flush_progress(requeue=True)

    asyncio.run(go())
    (st,) = _stagings(db)
    assert (st.state, st.files_done, st.bytes_done, st.files_total) == ("queued", 1, 10, 4)


def test_an_action_that_raises_is_retried_then_given_up(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1))
    for _ in range(MAX_INTERNAL_ERROR_ATTEMPTS):
        agent = FakeAgent(TypeError("a bug on the daemon's side"))
        _run(Executor(settings, db, FakeNodes(n1=agent)), _stage(job_id))
    (st,) = _stagings(db)
    assert (st.state, st.attempts) == ("failed", MAX_INTERNAL_ERROR_ATTEMPTS)
    assert st.error.startswith(f"gave up after {MAX_INTERNAL_ERROR_ATTEMPTS} attempts: internal")


# ---------------------------------------------------------------------------- meters


def _sample(executor: Executor, name: str, **labels: str) -> float:
    """One sample of the executor's meters (0 when the series does not exist yet)."""
    for metric in executor.records.meters.collect():
        for s in metric.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def test_a_stage_in_counts_its_fetches_hits_and_outcome_once_each(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1), _in(2))
    agent = FakeAgent(
        # 3 objects, 2 fetched (200 bytes): reported as they go, then as the result.
        Reply(
            StageReply("", False, [StageProgress(1, 3, 300, 3, 300, 2, 200)]),
            progress=[
                StageProgress(1, 0, 0, None, None, 1, 0),  # a fetch started
                StageProgress(1, 1, 100, None, None, 2, 100),
            ],
        ),
        Reply(StageReply("", False, [StageProgress(2, 4, 40, 4, 40, 0, 0)])),  # all hits
    )
    executor = Executor(settings, db, FakeNodes(n1=agent))
    _run(executor, _stage(job_id))
    node = {"node": NODE}
    assert _sample(executor, "hpcstage_store_fetched_objects_total", **node) == 2
    assert _sample(executor, "hpcstage_store_fetched_bytes_total", **node) == 200
    assert _sample(executor, "hpcstage_cache_misses_total", **node) == 2
    assert _sample(executor, "hpcstage_cache_hits_total", **node) == 1 + 4
    ready = {"direction": "in", "outcome": "ready"}
    assert _sample(executor, "hpcstage_staging_attempts_total", **ready) == 2
    # Both inputs ready: the job's time to ready is observed once, not once per input.
    assert _sample(executor, "hpcstage_job_time_to_ready_seconds_count", kind="job") == 1


def test_a_requeued_stage_in_counts_its_outcome_and_no_time_to_ready(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1))
    agent = FakeAgent(AgentError("SlowDown", transient=True))
    executor = Executor(settings, db, FakeNodes(n1=agent))
    _run(executor, _stage(job_id))
    requeued = {"direction": "in", "outcome": "requeued"}
    assert _sample(executor, "hpcstage_staging_attempts_total", **requeued) == 1
    assert _sample(executor, "hpcstage_job_time_to_ready_seconds_count", kind="job") == 0


def test_a_stage_out_counts_uploaded_files_once(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _out(1), state="COMPLETED")
    sent = FileOutcome("out1/a", "run1/a", 4, "uploaded", error="", trash_key="")
    there = FileOutcome("out1/b", "run1/b", 9, "present", error="", trash_key="")
    reports = [
        StageOutProgress(1, [sent], 1, 4, files_total=2, bytes_total=13, fetched=1),
        StageOutProgress(1, [sent, there], 2, 13, files_total=2, bytes_total=13, fetched=1),
    ]
    agent = FakeAgent(Reply(StageOutReply([StageOutResult(1, 2, 13, 1)]), progress=reports))
    executor = Executor(settings, db, FakeNodes(n1=agent))
    _run(executor, planner.StageOut(job_id, NODE, "ended"))
    assert _sample(executor, "hpcstage_store_uploaded_objects_total", node=NODE) == 1
    assert _sample(executor, "hpcstage_store_uploaded_bytes_total", node=NODE) == 4
    ready = {"direction": "out", "outcome": "ready"}
    assert _sample(executor, "hpcstage_staging_attempts_total", **ready) == 1


def test_a_job_waiting_for_its_inputs_is_observed_once_they_are_ready_where_it_runs(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    waiting, unseen = _job(db, _in(1)), _job(db, _in(2), slurm_id=8, nodes="")
    with db.begin() as session:
        session.get_one(Job, waiting).nodes = NODE  # the daemon saw it run on n1
    agent = FakeAgent(
        Reply(StageReply("", False, [StageProgress(1, 1, 1, 1, 1, 1, 1)])),
        Reply(StageReply("", False, [StageProgress(2, 1, 1, 1, 1, 1, 1)])),
    )
    executor = Executor(settings, db, FakeNodes(n1=agent))
    meters = executor.records.meters
    with db.begin() as session:
        assert not ready_where_running(session, waiting)
    meters.job_asked(waiting, ready=False)
    meters.job_asked(unseen, ready=False)
    _run(executor, _stage(waiting))
    _run(executor, _stage(unseen))
    assert _sample(executor, "hpcstage_job_data_wait_seconds_count") == 1
    # Ready, but on no node it is known to run on yet: still waiting (a tick ends it later).
    assert meters.waiting() == [unseen]
    with db.begin() as session:
        assert ready_where_running(session, waiting)
        assert not ready_where_running(session, unseen)


def test_a_dataset_several_jobs_of_an_account_hold_on_a_node_counts_once_in_its_quota(
    db: sessionmaker[Session],
) -> None:
    settings = parse_config(
        '[site]\nname = "t"\nstate_dir = "/nonexistent"\n'
        '[store]\nendpoint_url = "http://127.0.0.1:9"\n'
        "[quotas]\naccount_bytes_per_node = 100\n"
    )
    holder = _job(db, _in(1), slurm_id=5)
    with db.begin() as session:
        (request,) = session.get_one(Job, holder).requests
        session.add(Staging(request_id=request.id, node=NODE, state="ready", bytes_done=80))
    same, other = _job(db, _in(1), slurm_id=6), _job(db, _in(2), slurm_id=8)
    reply = Reply(StageReply("", False, [StageProgress(1, 1, 1, 1, 1, 1, 1)]))
    limits = []
    for job_id in (same, other):
        agent = FakeAgent(reply)
        _run(Executor(settings, db, FakeNodes(n1=agent)), _stage(job_id))
        limits.append(agent.calls[0][1]["items"][0]["max_bytes"])
    # The same dataset: one copy in the cache, already the account's; another one: 20 left.
    assert limits == [100, 20]


# ---------------------------------------------------------------------------- fan-out

NODES = ("n1", "n2", "n3")
BIG = PeerObject("c" * 64, "set1/big", "e" * 32, 5 << 20, "")


class OpAgent:
    """An agent answering each call by its name, as a node holding or lacking ``BIG``;
    ``gate``: its stage waits for it (a fetch from the store that takes a while)."""

    def __init__(self, name: str, gate: asyncio.Event | None = None) -> None:
        self.name = name
        self.gate = gate
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(
        self,
        op: str,
        params: dict[str, Any],
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        self.calls.append((op, params))
        if op == "stage" and self.gate is not None:
            await self.gate.wait()
        fetched = 1 if self.gate is not None else 0
        replies: dict[str, Any] = {
            "stage": StageReply(
                "", False, [StageProgress(1, 1, BIG.size, 1, BIG.size, fetched, 0)]
            ),
            "peer_list": PeerListReply([BIG], ""),
            "peer_want": PeerWantReply([BIG.cache_id]),
            "peer_serve": PeerServeReply(4242, [BIG]),
            "peer_fetch": PeerPutReply(1, BIG.size, 0),
        }
        reply: dict[str, Any] = to_wire(replies[op])
        return reply

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]


def test_nodes_that_need_a_source_at_once_get_it_from_the_store_once_and_the_rest_node_to_node(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    job_id = _job(db, _in(1), nodes=",".join(NODES))

    async def go() -> dict[str, OpAgent]:
        gate = asyncio.Event()
        agents = {n: OpAgent(n, gate if n == "n1" else None) for n in NODES}
        executor = Executor(settings, db, FakeNodes(**cast(dict[str, FakeAgent], agents)))
        for node in NODES:
            executor.act(planner.Stage((0, 0.0, 0), job_id, node, "test"))
        for _ in range(20):
            await asyncio.sleep(0)
        # n1 fetches from the store; the others wait for it rather than fetch too.
        assert [a.ops() for a in agents.values()] == [["stage"], [], []]
        gate.set()
        while executor.tasks:
            await asyncio.gather(*executor.tasks.values(), return_exceptions=True)
            await asyncio.sleep(0)
        return agents

    agents = asyncio.run(go())
    assert sorted(agents["n1"].ops()) == ["peer_list"] * 2 + ["peer_serve"] * 2 + ["stage"]
    for node in ("n2", "n3"):
        assert agents[node].ops() == ["peer_want", "peer_fetch", "stage"], node
    # Each copy has its own secrets, given to its two agents only, and the holder's address.
    offers = [p for op, p in agents["n1"].calls if op == "peer_serve"]
    fetches = [agents[n].calls[1][1] for n in ("n2", "n3")]
    assert {(o["token"], o["proof"]) for o in offers} == {(f["token"], f["proof"]) for f in fetches}
    assert len({o["token"] for o in offers}) == 2
    assert all(o["host"] == "127.0.0.1" and len(o["token"]) == 64 for o in offers)
    assert all(f["port"] == 4242 and f["host"] == "127.0.0.1" for f in fetches)
    assert [s.state for s in _stagings(db)] == ["ready"] * 3
    copied = [e for e in _events(db) if "copied 1 objects" in e]
    assert len(copied) == 2 and all("from n1's cache" in e for e in copied), copied
    waits = [e for e in _events(db) if e.startswith("waiting for")]
    assert (
        waits
        == ["waiting for n1 to fetch s3://data/set1/ from the store, to copy it from there"] * 2
    )


def test_two_jobs_waiting_for_a_source_on_one_node_copy_it_there_once(
    settings: Settings, db: sessionmaker[Session]
) -> None:
    first = _job(db, _in(1), nodes="n1,n2")
    second = _job(db, _in(1), nodes="n2", slurm_id=8)

    async def go() -> dict[str, OpAgent]:
        gate = asyncio.Event()
        agents = {"n1": OpAgent("n1", gate), "n2": OpAgent("n2")}
        executor = Executor(settings, db, FakeNodes(**cast(dict[str, FakeAgent], agents)))
        for job_id, node in ((first, "n1"), (first, "n2"), (second, "n2")):
            executor.act(planner.Stage((0, 0.0, 0), job_id, node, "test"))
        for _ in range(20):
            await asyncio.sleep(0)
        gate.set()
        while executor.tasks:
            await asyncio.gather(*executor.tasks.values(), return_exceptions=True)
            await asyncio.sleep(0)
        return agents

    agents = asyncio.run(go())
    # The second job's stage on n2 waited for the first's, which copied; it found it cached.
    assert agents["n2"].ops() == ["peer_want", "peer_fetch", "stage", "stage"]
    assert [s.state for s in _stagings(db)] == ["ready"] * 3


def test_each_group_of_nodes_fetches_a_source_once_and_copies_only_within_itself(
    db: sessionmaker[Session],
) -> None:
    settings = parse_config(
        '[site]\nname = "t"\nstate_dir = "/nonexistent"\n'
        '[store]\nendpoint_url = "http://127.0.0.1:9"\n'
        '[transfer]\npeer_groups = [["n1", "n2"], ["n3"]]\n'
    )
    job_id = _job(db, _in(1), nodes=",".join(NODES))

    async def go() -> dict[str, OpAgent]:
        gate = asyncio.Event()
        agents = {n: OpAgent(n, gate if n != "n2" else None) for n in NODES}
        executor = Executor(settings, db, FakeNodes(**cast(dict[str, FakeAgent], agents)))
        for node in NODES:
            executor.act(planner.Stage((0, 0.0, 0), job_id, node, "test"))
        for _ in range(20):
            await asyncio.sleep(0)
        # One fetch in each group: n1 for n1 and n2, n3 for itself.
        assert [a.ops() for a in agents.values()] == [["stage"], [], ["stage"]]
        gate.set()
        while executor.tasks:
            await asyncio.gather(*executor.tasks.values(), return_exceptions=True)
            await asyncio.sleep(0)
        return agents

    agents = asyncio.run(go())
    assert agents["n2"].ops() == ["peer_want", "peer_fetch", "stage"]
    assert sorted(agents["n1"].ops()) == ["peer_list", "peer_serve", "stage"]
    assert agents["n3"].ops() == ["stage"]

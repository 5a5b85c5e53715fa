"""The daemon's last-resort path (an unexpected error in a staging action) ends after a bounded
number of attempts, and per-file outcomes with names that are not UTF-8 are stored escaped.

The daemon's executor on a real SQLite state database; the failing action is a real asyncio
task. (tests/unit/test_executor.py covers the other outcomes of actions.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcstage.config.load import parse_config
from hpcstage.db import open_db
from hpcstage.db.models import Event, Job, Request, Staging, Upload
from hpcstage.protocol.framing import RpcClient
from hpcstage.protocol.messages import FileOutcome
from hpcstage.staging.executor import Executor
from hpcstage.staging.records import MAX_INTERNAL_ERROR_ATTEMPTS

NODE = "n1"


class NoNodes:
    """A node pool no action here reaches (the failing actions never ask for an agent)."""

    async def agent(self, node: str) -> RpcClient:
        raise AssertionError(node)

    def node_failed(self, node: str) -> None:
        raise AssertionError(node)

    def backing_off(self, node: str) -> bool:
        return False

    def known_nodes(self) -> list[str]:
        return []

    def powered_down(self, node: str) -> bool:
        return False

    def peer_address(self, node: str) -> str:
        return "127.0.0.1"


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[Executor]:
    text = (Path(__file__).resolve().parents[2] / "examples" / "site.toml").read_text()
    text = text.replace('state_dir = "/var/lib/hpcstage"', f'state_dir = "{tmp_path}"')
    db = open_db(f"sqlite:///{tmp_path}/state.db")
    yield Executor(parse_config(text), db, NoNodes())
    db.kw["bind"].dispose()  # Python 3.13 warns of sqlite connections left open


def _stage_out_staging(executor: Executor) -> tuple[int, int]:
    """A job with one stage-out directive and its staging on NODE: (job id, staging id)."""
    with executor.records.db.begin() as session:
        job = Job(slurm_job_id=7, user="bob", state="COMPLETED", batch_host=NODE)
        request = Request(direction="out", src="out", dest="s3://results/x/")
        job.requests.append(request)
        staging = Staging(node=NODE, state="queued")
        request.stagings.append(staging)
        session.add(job)
        session.flush()
        return job.id, staging.id


def _fail_once(executor: Executor, job_id: int, staging_id: int, error: BaseException) -> None:
    """What one attempt whose action raises ``error`` does to the staging."""
    with executor.records.db.begin() as session:
        st = session.get_one(Staging, staging_id)
        if st.state != "queued":
            return
        st.state = "running"
        st.attempts += 1  # as _stage and _stage_out count every attempt

    async def action() -> None:
        raise error

    async def run() -> asyncio.Task[None]:
        task = asyncio.create_task(action())
        await asyncio.gather(task, return_exceptions=True)
        return task

    executor.done((job_id, NODE), asyncio.run(run()))


def _staging(executor: Executor, staging_id: int) -> Staging:
    with executor.records.db.begin() as session:
        return session.get_one(Staging, staging_id)


def test_an_error_in_every_attempt_fails_the_staging_after_a_bounded_number(
    executor: Executor,
) -> None:
    job_id, staging_id = _stage_out_staging(executor)
    for _ in range(3 * MAX_INTERNAL_ERROR_ATTEMPTS):
        _fail_once(executor, job_id, staging_id, RuntimeError("a bug"))
    st = _staging(executor, staging_id)
    assert (st.state, st.attempts) == ("failed", MAX_INTERNAL_ERROR_ATTEMPTS)
    assert st.error == (
        f"gave up after {MAX_INTERNAL_ERROR_ATTEMPTS} attempts: internal error: RuntimeError: a bug"
    )
    with executor.records.db.begin() as session:
        last = session.query(Event).order_by(Event.id.desc()).first()
        assert last is not None and last.message == st.error


def test_an_error_quoting_a_name_that_is_not_utf8_is_stored_escaped(executor: Executor) -> None:
    job_id, staging_id = _stage_out_staging(executor)
    _fail_once(executor, job_id, staging_id, ValueError("cannot read out/bad\udcff.txt"))
    st = _staging(executor, staging_id)
    assert st.state == "queued"
    assert st.error == "internal error: ValueError: cannot read out/bad\\xff.txt"


def test_per_file_outcomes_with_names_that_are_not_utf8_are_stored_escaped(
    executor: Executor,
) -> None:
    _, staging_id = _stage_out_staging(executor)
    name = "out/bad\udcff.txt"  # as an older agent would report it
    executor.records.files[staging_id] = {
        name: FileOutcome(
            path=name,
            key="x/bad\udcff.txt",
            size=3,
            state="failed",
            error=f"{name}: no",
            trash_key="",
        ),
    }
    with executor.records.db.begin() as session:
        executor.records.save_files(session, session.get_one(Staging, staging_id))
    with executor.records.db.begin() as session:
        row = session.query(Upload).one()
        assert (row.path, row.key, row.error) == (
            "out/bad\\xff.txt",
            "x/bad\\xff.txt",
            "out/bad\\xff.txt: no",
        )

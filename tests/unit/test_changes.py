"""Long polling: the count of committed job changes (db/changes.py) and live progress."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.api.status import staging_document
from hpcstage.db import Job, Request, Staging, changes, open_db
from hpcstage.db.changes import Changes
from hpcstage.watch.fold import log_event


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    made = open_db(f"sqlite:///{tmp_path / 'state.db'}")
    yield made
    bind = made.kw["bind"]
    bind.dispose()


def _new_job(factory: sessionmaker[Session], name: str = "j") -> tuple[int, int]:
    """A job with one input staged on n1: (job id, staging id)."""
    with factory.begin() as session:
        job = Job(name=name, user="alice")
        job.requests = [Request(direction="in", position=0, src="s3://b/k", dest="k", line=1)]
        session.add(job)
        session.flush()
        st = Staging(request_id=job.requests[0].id, node="n1", state="queued")
        session.add(st)
        session.flush()
        return job.id, st.id


def _watched(factory: sessionmaker[Session]) -> tuple[Changes, int, int]:
    """A counter watching ``factory``'s commits, after one job was added: (counter, job id,
    staging id)."""
    seen = Changes()
    seen.watch(factory)
    return (seen, *_new_job(factory))


def test_a_waiter_wakes_for_its_own_job_not_for_others() -> None:
    async def main() -> None:
        seen = Changes()
        since = seen.count
        waiter = asyncio.create_task(seen.wait(1, since, 30))
        await asyncio.sleep(0.01)
        seen.bump({2})  # another job changed: keep waiting
        await asyncio.sleep(0.05)
        assert not waiter.done()
        seen.bump({1})
        await asyncio.wait_for(waiter, 1)  # at once, not after 30 s
        assert seen.changed(1, since) and seen.changed(2, since)
        assert not seen.changed(1, seen.count)

    asyncio.run(main())


def test_a_wait_without_news_ends_at_its_timeout_and_without_since_at_once() -> None:
    async def main() -> None:
        seen = Changes()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await seen.wait(1, None, 30)  # no earlier answer: nothing to wait for
        assert loop.time() - start < 1
        await seen.wait(1, seen.count, 0.2)
        assert loop.time() - start >= 0.19

    asyncio.run(main())


def test_counts_from_before_a_restart_or_too_old_to_tell_count_as_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(changes, "REMEMBERED", 3)
    seen = Changes()
    assert seen.changed(7, 41)  # the daemon restarted: its count is lower than the client's
    for job in range(1, 6):
        seen.bump({job})
    # job 1 and 2 are forgotten: a client that saw count 1 cannot be told "no news" for them
    assert seen.changed(1, 1)
    assert seen.changed(9, 1)
    assert not seen.changed(9, seen.count)
    assert not seen.changed(5, 5) and seen.changed(5, 4)


def test_commits_that_change_a_job_bump_and_reads_do_not(
    factory: sessionmaker[Session],
) -> None:
    seen, job_id, staging_id = _watched(factory)
    assert seen.count >= 1 and seen.changed(job_id, 0)
    before = seen.count
    with factory.begin() as session:  # a read, as the API does
        assert session.get_one(Job, job_id).name == "j"
    with factory.begin() as session:  # progress counters alone: shown live, no wake-up
        session.get_one(Staging, staging_id).files_done = 3
    assert seen.count == before
    with factory.begin() as session:  # a staging finishing logs an event for its job
        session.get_one(Staging, staging_id).state = "ready"
        log_event(session, job_id, "n1", "ready: s3://b/k -> k")
    assert seen.count == before + 1 and seen.changed(job_id, before)
    with factory.begin() as session:  # the job's own row changes (Slurm state)
        session.get_one(Job, job_id).state = "RUNNING"
    assert seen.count == before + 2
    other, _ = _new_job(factory, "other")
    assert not seen.changed(job_id, before + 2) and seen.changed(other, before + 2)


def test_a_rolled_back_change_is_not_carried_into_the_next_commit(
    factory: sessionmaker[Session],
) -> None:
    seen, job_id, staging_id = _watched(factory)
    before = seen.count
    with factory() as session:
        session.get_one(Job, job_id).state = "RUNNING"
        log_event(session, job_id, "", "never committed")
        session.flush()
        session.rollback()
        # The same session goes on with a change to no job (progress counters): nothing
        # woken, although the rolled-back flush had touched the job.
        session.get_one(Staging, staging_id).files_done = 1
        session.commit()
    assert seen.count == before


def test_a_savepoint_rolled_back_keeps_what_the_transaction_changed_before(
    factory: sessionmaker[Session],
) -> None:
    seen, job_id, staging_id = _watched(factory)
    before = seen.count
    with factory.begin() as session:
        session.get_one(Job, job_id).state = "RUNNING"
        session.flush()
        nested = session.begin_nested()
        session.get_one(Staging, staging_id).files_done = 1
        session.flush()
        nested.rollback()
    assert seen.count == before + 1 and seen.changed(job_id, before)


def test_a_commit_in_another_thread_is_handed_to_the_loop() -> None:
    async def main() -> None:
        seen = Changes()
        seen.bind(asyncio.get_running_loop())
        waiter = asyncio.create_task(seen.wait(4, seen.count, 30))
        await asyncio.sleep(0.01)
        thread = threading.Thread(target=seen.bump, args=({4},))
        thread.start()
        thread.join()
        assert seen.count == 0  # not counted in that thread: handed to this loop
        await asyncio.wait_for(waiter, 1)
        assert seen.count == 1

    asyncio.run(main())


def test_status_shows_live_counters_of_a_running_staging_only() -> None:
    live = {"files_done": 7, "bytes_done": 7000, "files_total": 10, "fetched_files": 7}
    running = Staging(node="n1", state="running", files_done=2, bytes_done=2000)
    running.uploads = []
    doc = staging_document(running, live)
    assert (doc["files_done"], doc["bytes_done"], doc["files_total"]) == (7, 7000, 10)
    done = Staging(node="n1", state="ready", files_done=10, bytes_done=10000)
    done.uploads = []
    assert staging_document(done, live)["files_done"] == 10  # the row is final

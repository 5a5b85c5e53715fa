"""The daemon's lock on its SQLite state (leader.py): one active daemon, the others wait."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from hpcstage.config.load import parse_config
from hpcstage.errors import StateUnavailable
from hpcstage.service import leader
from hpcstage.service.daemon import Daemon
from hpcstage.service.leader import FileLock, PgAdvisoryLock, state_lock


def test_the_lock_of_a_state_database_follows_its_url(tmp_path: Path) -> None:
    found = state_lock(f"sqlite:///{tmp_path}/state.db")
    assert isinstance(found, FileLock) and found.path == tmp_path / "state.db.daemon-lock"
    assert state_lock("sqlite://") is None  # in memory: nothing to share
    assert isinstance(state_lock("postgresql+psycopg://u@127.0.0.1/db"), PgAdvisoryLock)
    assert state_lock("mysql://u@h/db") is None


def test_a_second_holder_is_refused_until_the_first_lets_go(tmp_path: Path) -> None:
    first, second = FileLock(tmp_path / "l"), FileLock(tmp_path / "l")
    assert first.try_acquire() and first.still_held()
    assert not second.try_acquire() and not second.still_held()
    # The one waiting can say who is active (the record the holder wrote).
    assert f"pid {os.getpid()}" in second.holder() and "active since" in second.holder()
    first.release()
    assert not first.still_held()
    assert second.try_acquire()
    second.release()


def test_a_lock_file_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "missing-dir" / "state.db.daemon-lock")
    with pytest.raises(StateUnavailable, match="cannot open the daemon lock"):
        lock.try_acquire()
    assert lock.holder() == ""


def test_a_lock_file_replaced_under_the_holder_is_no_longer_held(tmp_path: Path) -> None:
    path = tmp_path / "state.db.daemon-lock"
    first = FileLock(path)
    assert first.try_acquire()
    path.unlink()  # an admin cleaning up: a second daemon would lock a new file
    assert not first.still_held()
    first.release()


class FakeLock:
    """A StateLock whose answers the test sets."""

    where = "fake state"

    def __init__(self, answers: list[bool | Exception], grace: float = 0.0) -> None:
        self.answers = answers
        self.takeover_grace = grace
        self.attempts = 0
        self.held = True
        self.released = False

    def try_acquire(self) -> bool:
        self.attempts += 1
        answer = self.answers.pop(0) if self.answers else False
        if isinstance(answer, Exception):
            raise answer
        return answer

    def holder(self) -> str:
        return "n0 pid 1"

    def still_held(self) -> bool:
        return self.held

    def release(self) -> None:
        self.released = True


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    monkeypatch.setattr(leader, "STANDBY_RETRY", 0.01)
    monkeypatch.setattr(leader, "CHECK_EVERY", 0.01)
    text = (Path(__file__).resolve().parents[2] / "examples" / "site.toml").read_text()
    text = text.replace('state_dir = "/var/lib/hpcstage"', f'state_dir = "{tmp_path}"')
    return Daemon(parse_config(text))


def test_a_standby_takes_over_when_the_lock_frees_after_its_grace(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    lock = FakeLock([False, False, True], grace=0.05)
    caplog.set_level(logging.INFO, "hpcstage.daemon")
    assert asyncio.run(daemon._elect(lock))
    assert lock.attempts == 3
    said = caplog.text
    assert "standing by: another hpcstage daemon is active on the fake state (n0 pid 1)" in said
    assert said.index("taking over the fake state") < said.index("active: this daemon holds")


def test_a_free_lock_is_taken_at_once_without_grace(daemon: Daemon) -> None:
    lock = FakeLock([True], grace=60)  # no one was active: nothing to wait for
    assert asyncio.run(asyncio.wait_for(daemon._elect(lock), 5))


def test_a_standby_stops_on_request(daemon: Daemon) -> None:
    async def main() -> bool:
        asyncio.get_running_loop().call_later(0.05, daemon.stop)
        return await daemon._elect(FakeLock([]))

    assert asyncio.run(asyncio.wait_for(main(), 5)) is False


def test_an_unreachable_state_fails_the_first_attempt_and_is_retried_later(
    daemon: Daemon,
) -> None:
    with pytest.raises(StateUnavailable):
        asyncio.run(daemon._elect(FakeLock([StateUnavailable("down")])))
    lock = FakeLock([False, StateUnavailable("restarting"), True])
    assert asyncio.run(daemon._elect(lock)) and lock.attempts == 3


def test_an_active_daemon_that_loses_the_lock_stops_with_status_3(daemon: Daemon) -> None:
    lock = FakeLock([True])
    lock.held = False

    async def main() -> None:
        await asyncio.wait_for(daemon._watch_lock(lock), 5)

    asyncio.run(main())
    assert daemon.exit_code == 3 and daemon._stopping.is_set()

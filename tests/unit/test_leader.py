"""The daemon's lock on its SQLite state (leader.py): one active daemon, the others wait."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcstage import leader
from hpcstage.leader import FileLock, PgAdvisoryLock, StateUnavailable, state_lock


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


def test_the_advisory_lock_key_is_one_per_site_and_fits_postgresql() -> None:
    assert 0 < leader.PG_LOCK_KEY < 2**32  # pg_locks shows it as objid, classid 0

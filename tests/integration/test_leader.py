"""The daemon's lock on a PostgreSQL state database (leader.py), against a real server."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from hpcstage.errors import StateUnavailable
from hpcstage.service.leader import PgAdvisoryLock

from .staging import TEST_DATABASE, drop_stale_databases, scratch_database

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def state_url(pg_admin_url: str) -> Iterator[str]:
    with scratch_database(pg_admin_url, "lock") as url:
        yield url


def test_one_daemon_holds_the_lock_and_another_takes_it_when_its_session_dies(
    state_url: str,
) -> None:
    active, standby = PgAdvisoryLock(state_url), PgAdvisoryLock(state_url)
    try:
        assert active.try_acquire() and active.still_held()
        assert not standby.try_acquire()
        assert "hpcstage daemon" in standby.holder()  # who is active, from pg_stat_activity
        # The active daemon's session dies (a database restart, a network cut): the lock
        # goes with it, the active daemon can tell, and the standby gets it.
        engine = create_engine(state_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND application_name LIKE 'hpcstage daemon %'"
                )
            ).all()
        engine.dispose()
        assert killed
        assert not active.still_held()
        assert standby.try_acquire() and standby.still_held()
    finally:
        active.release()
        standby.release()


def test_databases_of_killed_test_runs_are_dropped_and_live_ones_kept(pg_admin_url: str) -> None:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: no process has its pid now
    dead_pid = child.pid
    stale = f"{TEST_DATABASE}{dead_pid}_killed_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{stale}"'))
        with scratch_database(pg_admin_url, "live") as live_url:
            dropped = drop_stale_databases(pg_admin_url)
            with admin.connect() as conn:
                names = set(conn.execute(text("SELECT datname FROM pg_database")).scalars())
            assert stale in dropped and stale not in names
            live = live_url.rsplit("/", 1)[1]
            assert live in names and live not in dropped  # this run's own: still in use
        with admin.connect() as conn:
            names = set(conn.execute(text("SELECT datname FROM pg_database")).scalars())
        assert live not in names, "the scratch database outlived its fixture"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{stale}" WITH (FORCE)'))
        admin.dispose()


def test_an_unreachable_state_database_is_a_clear_error() -> None:
    lock = PgAdvisoryLock("postgresql+psycopg://nobody@127.0.0.1:9/nowhere?connect_timeout=2")
    try:
        with pytest.raises(StateUnavailable, match="cannot reach the state database nowhere"):
            lock.try_acquire()
    finally:
        lock.release()


def test_hpcstage_daemon_with_an_unreachable_state_database_says_so(tmp_path: Path) -> None:
    text_ = (EXAMPLES / "site.toml").read_text()
    assert 'state_url = ""' in text_
    config = tmp_path / "site.toml"
    config.write_text(
        text_.replace(
            'state_url = ""', 'state_url = "postgresql+psycopg://nobody@127.0.0.1:9/nowhere"'
        ).replace('state_dir = "/var/lib/hpcstage"', f'state_dir = "{tmp_path}"')
    )
    done = subprocess.run(
        [sys.executable, "-m", "hpcstage", "daemon", "--config", str(config), "--no-api"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "cannot reach the state database nowhere" in done.stderr
    assert "Traceback" not in done.stderr

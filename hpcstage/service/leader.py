"""One active daemon per state database; any other one stands by and takes over.

Two daemons acting on the same state would plan and start every transfer twice. The daemon
therefore holds a lock on its state for as long as it runs:

- SQLite (one host): ``flock`` on ``<database file>.daemon-lock``, which also records who
  holds it (pid, host, since);
- PostgreSQL (the HA setup: daemons on several hosts, one database): a session-level
  advisory lock on a connection of its own, named ``hpcstage daemon <host> pid <pid>`` so
  that the waiting daemons and ``pg_stat_activity`` can say who holds it.

A daemon that finds the lock held waits ("standby") and becomes active when the holder
stops or dies (the kernel drops a dead process's flock; PostgreSQL drops a dead session's
advisory locks). An active daemon that loses its PostgreSQL session has lost the lock with
it: ``still_held`` says so and the daemon stops, so that its supervisor restarts it into a
new election instead of two daemons acting at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import zlib
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, Engine, create_engine, make_url, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from hpcstage.errors import ConfigError, StateUnavailable

STANDBY_RETRY = 2.0  # seconds between a standby daemon's attempts to take the lock
CHECK_EVERY = 5.0  # seconds between an active daemon's checks that it still holds it
PG_CONNECT_TIMEOUT = 5  # seconds
PG_TCP_TIMEOUT = 15  # seconds of unacknowledged data before a PostgreSQL connection is dead
# How long a daemon that saw another one active waits, once it has a PostgreSQL lock, before
# acting: the time the other one may take to notice that it lost the lock (a check, and a
# call on a dead connection timing out) and stop. Without it both could act for a moment
# after a database restart, which drops every session, the active daemon's lock included.
TAKEOVER_GRACE = CHECK_EVERY + PG_TCP_TIMEOUT + 5.0


# The advisory lock's key: one per database, the same for every hpcstage daemon.
PG_LOCK_KEY = zlib.crc32(b"hpcstage daemon")


class StateLock(Protocol):
    """The daemon's claim on its state database."""

    where: str  # what is locked, for messages
    # Seconds a daemon that saw another one active waits, once it has the lock, before acting.
    takeover_grace: float

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True when this process holds it."""

    def holder(self) -> str:
        """Who holds it now, as well as can be told ('' if unknown)."""

    def still_held(self) -> bool:
        """Whether this process still holds it (False: stop acting)."""

    def release(self) -> None:
        """Give it up (also on exit: the operating system or the database drops it)."""


def me() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


class FileLock:
    """``flock`` on a file beside the SQLite database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        # A flock is only ever dropped by its holder, or with its holder's death: no grace.
        self.takeover_grace = 0.0
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateUnavailable(f"cannot open the daemon lock {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        record = {"holder": me(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            record = json.loads(self.path.read_text())
            return f"{record['holder']}, active since {record['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def still_held(self) -> bool:
        # Held, and still on the file others would lock (not one removed or replaced since).
        if self._fd is None:
            return False
        try:
            return os.fstat(self._fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class PgAdvisoryLock:
    """A session-level PostgreSQL advisory lock on a connection kept for the daemon's life."""

    def __init__(self, url: str) -> None:
        self.where = f"state database {make_url(url).database} (PostgreSQL advisory lock)"
        self.takeover_grace = TAKEOVER_GRACE
        # No pool: a refused attempt closes its connection, the held one is the only one.
        # Keepalives both ways: the server drops the session (and the lock) of a host that
        # died or was cut off within about half a minute, not after the kernel's two hours;
        # and no call on this connection blocks the daemon for longer than that.
        try:
            self._engine: Engine = create_engine(
                url, poolclass=NullPool, connect_args=_pg_session_args()
            )
        except Exception as exc:  # a missing driver (a URL naming another one), a bad URL
            raise ConfigError(f"site.state_url: cannot use {url!r}: {exc}") from exc
        self._conn: Connection | None = None

    def try_acquire(self) -> bool:
        try:
            conn = self._engine.connect()
        except SQLAlchemyError as exc:
            raise StateUnavailable(f"cannot reach the {self.where}: {exc}") from exc
        try:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": PG_LOCK_KEY})
            held = bool(got.scalar())
            conn.commit()
        except SQLAlchemyError as exc:
            conn.close()
            raise StateUnavailable(f"cannot lock the {self.where}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        if not held:
            conn.close()
            return False
        self._conn = conn
        return True

    def holder(self) -> str:
        query = text(
            "SELECT a.application_name, a.client_addr, a.backend_start FROM pg_locks l"
            " JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory'"
            " AND l.granted AND l.classid::bigint = 0 AND l.objid::bigint = :key"
            " AND a.datname = current_database()"
        )
        try:
            with self._engine.connect() as conn:
                row = conn.execute(query, {"key": PG_LOCK_KEY}).first()
        except Exception:  # only a message depends on it
            return ""
        if row is None:
            return ""
        name, addr, since = row
        return f"{name or 'a session'} from {addr or 'the local socket'}, since {since:%H:%M:%S}"

    def still_held(self) -> bool:
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
            self._conn.commit()
        except Exception:  # any failure: the session, and the lock with it, may be gone
            return False
        return True

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PG_LOCK_KEY})
                self._conn.commit()
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        self._engine.dispose()


def _pg_session_args() -> dict[str, object]:
    return {
        "application_name": f"hpcstage daemon {me()}",
        "connect_timeout": PG_CONNECT_TIMEOUT,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": PG_TCP_TIMEOUT * 1000,
        "options": (
            "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
            f" -c tcp_user_timeout={PG_TCP_TIMEOUT * 1000}"
        ),
    }


def state_lock(url: str) -> StateLock | None:
    """The lock for the state database at ``url``; None where there is nothing to share (an
    in-memory SQLite database) or no way known to share it (a database other than SQLite
    and PostgreSQL: the site then runs one daemon itself)."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # SQLAlchemy's ArgumentError, or a ValueError
        raise ConfigError(f"site.state_url: cannot use {url!r}: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            return None
        return FileLock(Path(f"{parsed.database}.daemon-lock"))
    if parsed.get_backend_name() == "postgresql":
        return PgAdvisoryLock(url)
    return None

"""PostgreSQL for the state-backend tests: the machine's server if it trusts us, else a private one.

CI machines run PostgreSQL on 127.0.0.1:5432 with trust auth; a fresh Debian machine has at
most the packages (scripts/bootstrap installs them) and no server we may log in to. Then a
private, throw-away instance is started on a free loopback port under the given directory.
"""

from __future__ import annotations

import glob
import os
import pwd
from collections.abc import Callable
from pathlib import Path

from devcluster import proc
from devcluster.errors import ClusterError

MACHINE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def find_or_start(base: Path) -> tuple[str, Callable[[], None]]:
    """(admin URL, stop function). The URL's user may CREATE and DROP databases."""
    if _works(MACHINE_URL):
        return MACHINE_URL, lambda: None
    return _start_private(base)


def _works(url: str) -> bool:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except SQLAlchemyError:
        return False
    finally:
        engine.dispose()


def _start_private(base: Path) -> tuple[str, Callable[[], None]]:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    try:
        pg = pwd.getpwnam("postgres")
    except KeyError:
        pg = None
    if not bins or pg is None:
        raise ClusterError("no usable PostgreSQL: run scripts/bootstrap (installs postgresql)")
    bindir = Path(bins[-1]).parent
    data = base / "pgdata"
    data.mkdir(parents=True, exist_ok=True)
    os.chown(data, pg.pw_uid, pg.pw_gid)
    data.chmod(0o700)
    as_pg = ["runuser", "-u", "postgres", "--"]
    proc.run(
        [
            *as_pg,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ],
        timeout=120,
    )
    port = proc.free_port()
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    log = data / "server.log"
    proc.run(
        [
            *as_pg,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-o",
            options,
            "-w",
            "start",
        ],
        timeout=120,
    )

    def stop() -> None:
        proc.run(
            [*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            check=False,
            timeout=60,
        )

    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", stop

"""State database: open it (migrating to the newest schema) and hand out sessions."""

from __future__ import annotations

import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.core.fencing import Epoch
from hpcstage.db.models import (
    Base,
    Event,
    Fencing,
    Job,
    KeptWarm,
    Pack,
    Request,
    Staging,
    Upload,
)
from hpcstage.errors import ConfigError

__all__ = [
    "Base",
    "Event",
    "Fencing",
    "Job",
    "KeptWarm",
    "Pack",
    "Request",
    "Staging",
    "Upload",
    "open_db",
    "take_epoch",
]

MIGRATIONS = Path(__file__).parent / "migrations"


def open_db(url: str) -> sessionmaker[Session]:
    """Create the engine for ``url``, upgrade the schema to head, return a session factory."""
    engine = _engine(url)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)


def _engine(url: str) -> Engine:
    try:
        engine = create_engine(url, pool_pre_ping=True)
    except Exception as exc:  # bad URL or missing driver: tell the admin which
        raise ConfigError(f"site.state_url: cannot use {url!r}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    # WAL lets the API read while the daemon writes; foreign keys make cascades real.
    cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def migrate(engine: Engine) -> None:
    """Run Alembic migrations up to head on ``engine``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def take_epoch(db: sessionmaker[Session], holder: str) -> Epoch:
    """Begin a leadership term: one more than the last epoch, counted in one transaction (the
    row's lock orders two daemons that both think they lead), and the database's id."""
    with db.begin() as session:
        session.execute(
            update(Fencing)
            .where(Fencing.id == 1)
            .values(epoch=Fencing.epoch + 1, holder=holder, since=time.time())
        )
        state_id, number = session.execute(
            select(Fencing.state_id, Fencing.epoch).where(Fencing.id == 1)
        ).one()
    return Epoch(state_id, number)

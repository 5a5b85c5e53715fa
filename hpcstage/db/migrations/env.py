"""Alembic environment: migrations run on the connection handed over by hpcstage.db.migrate."""

from __future__ import annotations

from alembic import context

from hpcstage.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only through hpcstage.db.migrate
    raise RuntimeError("run migrations through hpcstage.db.migrate()")
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()

"""fencing: the state database's id and its leader epoch, counted up at each takeover

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "fencing",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("state_id", sa.String(32), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("since", sa.Float(), nullable=False),
    )
    # Made once, with the schema: the id the node caches know this database by.
    row = {"id": 1, "state_id": uuid.uuid4().hex, "epoch": 0, "holder": "", "since": 0.0}
    op.bulk_insert(table, [row])


def downgrade() -> None:
    op.drop_table("fencing")

"""kept_warm: datasets admins keep warm on chosen nodes (hpcstage pin), with a schedule

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "kept_warm",
        sa.Column(
            "id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("src", sa.Text(), nullable=False),
        sa.Column("nodes", sa.Text(), nullable=False),
        sa.Column("schedule", sa.String(128), nullable=False, server_default=""),
        sa.Column("until", sa.Float(), nullable=True),
        sa.Column("created_by", sa.String(64), nullable=False, server_default=""),
        sa.Column("created_at", sa.Float(), nullable=False, server_default="0"),
        sa.Column("last_refresh_at", sa.Float(), nullable=True),
        sa.Column("next_refresh_at", sa.Float(), nullable=True),
        sa.Column("removed_at", sa.Float(), nullable=True),
        sa.Column("removed_by", sa.String(64), nullable=False, server_default=""),
    )
    op.create_index("ix_kept_warm_removed_at", "kept_warm", ["removed_at"])


def downgrade() -> None:
    op.drop_index("ix_kept_warm_removed_at", "kept_warm")
    op.drop_table("kept_warm")

"""stage-out

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "uploads",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("staging_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("trash_key", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["staging_id"], ["stagings.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("staging_id", "path"),
    )
    op.create_index(op.f("ix_uploads_staging_id"), "uploads", ["staging_id"], unique=False)
    # Existing rows (a daemon upgraded in place) get the defaults the models use.
    op.add_column(
        "jobs", sa.Column("batch_host", sa.String(length=128), nullable=False, server_default="")
    )
    op.add_column(
        "requests", sa.Column("when", sa.String(length=16), nullable=False, server_default="always")
    )
    op.add_column(
        "requests", sa.Column("optional", sa.Boolean(), nullable=False, server_default=sa.false())
    )


def downgrade() -> None:
    op.drop_column("requests", "optional")
    op.drop_column("requests", "when")
    op.drop_column("jobs", "batch_host")
    op.drop_index(op.f("ix_uploads_staging_id"), table_name="uploads")
    op.drop_table("uploads")

"""stagings.peer_files: objects copied from another node's cache

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows (a daemon upgraded in place) copied nothing that was counted.
    op.add_column(
        "stagings",
        sa.Column("peer_files", sa.BigInteger(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_column("stagings", "peer_files")

"""requests.pack: a stage-out written as a new version of a packed dataset

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows were parsed before the flag existed: none of them packs.
    op.add_column(
        "requests", sa.Column("pack", sa.Boolean(), nullable=False, server_default=sa.false())
    )


def downgrade() -> None:
    op.drop_column("requests", "pack")

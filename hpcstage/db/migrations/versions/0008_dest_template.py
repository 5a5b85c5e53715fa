"""requests.dest_template: a stage-out's DEST before its %-patterns were expanded

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Older rows keep "": their DEST stays as it was expanded at admission.
    op.add_column(
        "requests", sa.Column("dest_template", sa.Text(), nullable=False, server_default="")
    )


def downgrade() -> None:
    op.drop_column("requests", "dest_template")

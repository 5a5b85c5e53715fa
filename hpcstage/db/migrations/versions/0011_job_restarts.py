"""jobs.restarts: how many times Slurm had requeued a job's run when the daemon last saw it

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Older rows keep NULL (not known): the daemon folds every open job once at start, which
    # sets it; until then a requeue is known by the submit time alone.
    op.add_column("jobs", sa.Column("restarts", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "restarts")

"""jobs.submitted_at, replaced_at, former_slurm_job_id: a reused Slurm job id is another job

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows keep NULLs: their jobs are told apart by when the daemon first saw them.
    op.add_column("jobs", sa.Column("submitted_at", sa.Float(), nullable=True))
    op.add_column("jobs", sa.Column("replaced_at", sa.Float(), nullable=True))
    op.add_column("jobs", sa.Column("former_slurm_job_id", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "former_slurm_job_id")
    op.drop_column("jobs", "replaced_at")
    op.drop_column("jobs", "submitted_at")

"""jobs.array_job_id, array_task_id, array_tasks: `hpcstage status` names array tasks A_a

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows keep NULLs and "": the next snapshot fills the jobs still in the queue.
    op.add_column("jobs", sa.Column("array_job_id", sa.BigInteger(), nullable=True))
    op.add_column("jobs", sa.Column("array_task_id", sa.Integer(), nullable=True))
    op.add_column(
        "jobs",
        sa.Column("array_tasks", sa.String(length=256), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_column("jobs", "array_tasks")
    op.drop_column("jobs", "array_task_id")
    op.drop_column("jobs", "array_job_id")

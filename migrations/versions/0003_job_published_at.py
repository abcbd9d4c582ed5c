"""job published_at: the outbox flag of a queued job

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 07:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("published_at", sa.DateTime(), nullable=True))
    # Jobs from before the column were published when they were created.
    op.execute("UPDATE jobs SET published_at = created_at")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("published_at")

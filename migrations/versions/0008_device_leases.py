"""device leases: which attempt holds which device of a host; where a job runs

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 21:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("placement", sa.JSON(), nullable=True))
    op.create_table(
        "device_leases",
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("device", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("host", "device"),
    )
    op.create_index("ix_device_leases_job_id", "device_leases", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_device_leases_job_id", table_name="device_leases")
    op.drop_table("device_leases")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("placement")

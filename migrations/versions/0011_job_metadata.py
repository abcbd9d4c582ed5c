"""jobs.metadata: string pairs a job's owner finds it by (GET /jobs?metadata=KEY:VALUE)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 20:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("metadata", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("metadata")

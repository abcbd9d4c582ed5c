"""evals: the sample generations kept with each evaluation

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Evaluations recorded before samples were kept have none.
    with op.batch_alter_table("evals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("samples", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))


def downgrade() -> None:
    with op.batch_alter_table("evals", schema=None) as batch_op:
        batch_op.drop_column("samples")

"""a job's webhook beside its spec: jobs.webhook_url, and notify out of the stored specs

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 04:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("spec", sa.JSON), sa.column("webhook_url", sa.Text))


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("webhook_url", sa.Text(), nullable=True))
    connection = op.get_bind()
    for job_id, spec in connection.execute(sa.select(jobs.c.id, jobs.c.spec)).all():
        if "notify" in spec:
            notify = spec.pop("notify") or {}
            connection.execute(
                jobs.update().where(jobs.c.id == job_id).values(spec=spec, webhook_url=notify.get("webhook_url"))
            )


def downgrade() -> None:
    connection = op.get_bind()
    for job_id, spec, url in connection.execute(sa.select(jobs.c.id, jobs.c.spec, jobs.c.webhook_url)).all():
        connection.execute(
            jobs.update().where(jobs.c.id == job_id).values(spec={**spec, "notify": {"webhook_url": url}})
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("webhook_url")

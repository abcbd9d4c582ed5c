"""a step's metrics are stored once, in its metrics event: the metrics table and jobs.latest_metrics go

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 05:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The metrics events have carried every step's values (and stage) all along: nothing to move.
    op.create_index("ix_job_events_job_type_id", "job_events", ["job_id", "type", "id"])
    op.drop_index("ix_metrics_job_name_step", table_name="metrics")
    op.drop_table("metrics")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("latest_metrics")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("latest_metrics", sa.JSON(), nullable=False, server_default="{}"))
    metrics = op.create_table(
        "metrics",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_metrics_job_name_step", "metrics", ["job_id", "name", "step"])
    # Filled again from the events, the latest run of each step winning, as the old writer left them.
    events = sa.table("job_events", sa.column("id"), sa.column("job_id"), sa.column("type"), sa.column("data", sa.JSON))
    jobs = sa.table("jobs", sa.column("id"), sa.column("latest_metrics", sa.JSON))
    connection = op.get_bind()
    points, latest = {}, {}
    query = sa.select(events.c.job_id, events.c.data).where(events.c.type == "metrics").order_by(events.c.id)
    for job_id, data in connection.execute(query):
        for name, value in data["values"].items():
            points[job_id, data["step"], name] = value
        latest[job_id] = {"step": data["step"], "stage": data.get("stage"), **data["values"]}
    if points:
        op.bulk_insert(metrics, [dict(job_id=j, step=s, name=n, value=v) for (j, s, n), v in points.items()])
    for job_id, values in latest.items():
        connection.execute(jobs.update().where(jobs.c.id == job_id).values(latest_metrics=values))
    op.drop_index("ix_job_events_job_type_id", table_name="job_events")

"""job_events: an index on (job_id, id) in place of the one on job_id, so that a job's newest event
(max(id) for a job: every event stream's tick, the job page's cursor) is one index lookup, not a scan
of all the job's entries

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 23:45:00
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_job_events_job_id_id", "job_events", ["job_id", "id"])
    op.drop_index("ix_job_events_job_id", table_name="job_events")


def downgrade() -> None:
    op.create_index("ix_job_events_job_id", "job_events", ["job_id"])
    op.drop_index("ix_job_events_job_id_id", table_name="job_events")

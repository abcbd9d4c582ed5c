"""The one Celery task: supervise a job (the real work runs in a child process). The service sends it
by name (`app.core.broker.send_job`)."""

from celery.exceptions import Ignore

from app.core.broker import RUN_JOB

from .celery_app import celery
from .supervisor import supervise


@celery.task(name=RUN_JOB)
def run_job(job_id: str) -> None:
    if not supervise(job_id):
        # Someone else holds the job (a redelivered message) or it was cancelled while queued:
        # nothing to do, and nothing to record as a failure.
        raise Ignore()

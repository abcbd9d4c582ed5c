"""The one Celery task: supervise a job (the real work runs in a child process)."""

from celery.exceptions import Ignore

from .celery_app import celery
from .supervisor import supervise


@celery.task(name="distill.run_job")
def run_job(job_id: str) -> None:
    if not supervise(job_id):
        # Someone else holds the job (a redelivered message) or it was cancelled while queued:
        # nothing to do, and nothing to record as a failure.
        raise Ignore()


def enqueue(job_id: str, queue: str) -> None:
    run_job.apply_async(args=[job_id], queue=queue)

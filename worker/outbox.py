"""Sending a queued job's message to the broker, and sending it again until it got there.

The job's row commits first and its message is sent after (the outbox pattern): a broker that is
down at that moment leaves the job queued with `published_at` unset instead of losing it, and the
reaper, which runs in the API server and in every worker, sends it once the broker answers. A
message sent twice is harmless: the first run claims the job and the other sees it taken.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from app import crud
from app.core.db import session_factory

log = logging.getLogger(__name__)

# How long the request that created a job has to send its message before the reaper does.
SEND_GRACE = timedelta(seconds=30)


def publish(job_id: str, queue: str) -> bool:
    """Send the job's message and record it; False (and the job left for the reaper) if the broker refused."""
    from worker.tasks import enqueue

    try:
        enqueue(job_id, queue)
    except Exception:  # kombu and redis raise many types; any of them means "not sent"
        log.warning("could not send job %s to the broker; the reaper sends it when the broker answers", job_id, exc_info=True)
        return False
    with session_factory()() as session:
        crud.mark_published(session, job_id)
    return True


def publish_pending() -> list[str]:
    """Send every queued job whose message never reached the broker; the ids sent."""
    with session_factory()() as session:
        pending = crud.unpublished(session, SEND_GRACE)
    return [job_id for job_id, queue in pending if publish(job_id, queue)]

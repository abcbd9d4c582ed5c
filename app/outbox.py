"""Sending a queued job's message to the broker, and sending it again until it got there.

The job's row commits first and its message is sent after (the outbox pattern): a broker that is
down at that moment leaves the job queued with `published_at` unset instead of losing it, and the
reaper, which runs in the API server and in every worker, sends it once the broker answers. A
message sent twice is harmless: the first run claims the job and the other sees it taken.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from app import job_status
from app.core.broker import broker, send_job
from app.core.config import get_settings
from app.core.db import session_factory

log = logging.getLogger(__name__)

# How long the request that created a job has to send its message before the reaper does.
SEND_GRACE = timedelta(seconds=30)


def publish(job_id: str, queue: str) -> bool:
    """Send the job's message and record it; False (and the job left for the reaper) if the broker refused."""
    try:
        send_job(job_id, queue)
    except Exception:  # kombu and redis raise many types; any of them means "not sent"
        log.warning(
            "could not send job %s to the broker; the reaper sends it when the broker answers", job_id, exc_info=True
        )
        return False
    with session_factory()() as session:
        job_status.mark_published(session, job_id)
    return True


def publish_pending() -> list[str]:
    """Send every queued job whose message never reached the broker; the ids sent."""
    with session_factory()() as session:
        pending = job_status.unpublished(session, SEND_GRACE)
    return [job_id for job_id, queue in pending if publish(job_id, queue)]


def resend_lost() -> list[str]:
    """Send again every queued job whose message the broker no longer holds; the ids sent.

    A Redis without persistence forgets its queues when it restarts, while `published_at` still says
    those messages were sent: without this, such jobs would stay queued for ever. Only Redis is
    asked (the embedded broker keeps its messages in a file). A job is looked for once its message
    has had SEND_GRACE to arrive; a message a worker is taking at that very moment may be sent
    twice, which is harmless (see above)."""
    if not get_settings().resolved_broker_url.startswith("redis"):  # redis:// and rediss://, as app.core.broker
        return []
    with session_factory()() as session:
        waiting = job_status.published_before(session, SEND_GRACE)
    if not waiting:
        return []
    with broker().connection_for_read() as connection:
        channel = connection.default_channel  # kombu's Redis channel: it knows the keys it stores messages under
        messages = [
            m
            for queue in {q for _, q in waiting}
            for priority in channel.priority_steps
            for m in channel.client.lrange(channel._q_for_pri(queue, priority), 0, -1)
        ]
        messages += channel.client.hvals(channel.unacked_key)  # delivered to a worker, not yet acknowledged
    held = b"\n".join(m if isinstance(m, bytes) else m.encode() for m in messages)
    lost = [(job_id, queue) for job_id, queue in waiting if job_id.encode() not in held]
    for job_id, _ in lost:
        log.warning(
            "the broker no longer holds the message of queued job %s (restarted without persistence?); "
            "sending it again",
            job_id,
        )
    return [job_id for job_id, queue in lost if publish(job_id, queue)]

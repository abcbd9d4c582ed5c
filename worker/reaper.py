"""Take up jobs whose worker stopped sending heartbeats: queue them again while attempts remain,
else mark them failed; and send the messages of queued jobs that never reached the broker. Runs in
the API server and in every worker; the status machine's conditional updates make it safe to run in
several places at once."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from app import crud
from app.core.config import get_settings
from app.core.db import session_factory
from app.models import Job
from worker.outbox import publish, publish_pending

log = logging.getLogger(__name__)


def reap_once() -> list[str]:
    """Queue stale jobs again and send their messages, and the messages of queued jobs never sent;
    the ids queued again."""
    settings = get_settings()
    with session_factory()() as session:
        requeued = crud.reap_stale(session, timedelta(seconds=settings.heartbeat_timeout_seconds))
        queues = {job_id: session.get(Job, job_id).queue for job_id in requeued}
    for job_id, queue in queues.items():
        publish(job_id, queue)  # if the broker is down, publish_pending sends it later
    publish_pending()
    return requeued


def reap_forever(stop: threading.Event) -> None:
    interval = get_settings().heartbeat_seconds
    while not stop.wait(interval):
        try:
            reap_once()
        except Exception:  # a database hiccup must not end the loop
            log.exception("reaping stale jobs failed; trying again")

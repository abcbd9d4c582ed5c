"""Take up jobs whose worker stopped sending heartbeats: queue them again while attempts remain,
else mark them failed; and send the messages of queued jobs that never reached the broker. Runs in
the API server and in every worker; the status machine's conditional updates make it safe to run in
several places at once. In a worker it also keeps the worker's entry in the registry of live workers
fresh, so the API knows which queues are served. And it sends the webhooks of jobs that ended
(app/webhooks.py), each claimed first, so that only one reaper sends it, and deletes the jobs that
ended more than DISTILL_RETENTION_DAYS ago (app/cleanup.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import timedelta

from app import cleanup, job_status, webhooks, worker_registry
from app.core.config import get_settings
from app.core.db import session_factory
from app.models import Job
from app.outbox import publish, publish_pending, resend_lost

log = logging.getLogger(__name__)


def reap_once() -> list[str]:
    """Queue stale jobs again and send their messages, and the messages of queued jobs never sent
    or lost by the broker; the ids queued again."""
    settings = get_settings()
    with session_factory()() as session:
        requeued = job_status.reap_stale(session, timedelta(seconds=settings.heartbeat_timeout_seconds))
        queues = {job_id: session.get(Job, job_id).queue for job_id in requeued}
    for job_id, queue in queues.items():
        publish(job_id, queue)  # if the broker is down, publish_pending sends it later
    publish_pending()
    resend_lost()  # queued jobs whose message a restarted broker forgot
    return requeued


def reap_forever(stop: threading.Event, queues: Sequence[str] = ()) -> None:
    """Reap every heartbeat until `stop` is set. In a worker, `queues` are the queues it consumes:
    registered at once, refreshed every heartbeat, and unregistered when `stop` is set."""
    interval, name = get_settings().heartbeat_seconds, worker_registry.worker_name()
    while True:
        if queues:
            _registered(lambda session: worker_registry.register(session, name, queues))
        if stop.wait(interval):
            break
        try:
            reap_once()
        except Exception:  # a database hiccup must not end the loop
            log.exception("reaping stale jobs failed; trying again")
        try:  # apart from reap_once: a broker outage must not hold up the webhooks of jobs that ended
            webhooks.deliver_due(stop=stop)
        except Exception:
            log.exception("sending webhooks failed; trying again")
        try:
            with session_factory()() as session:
                cleanup.delete_expired_jobs(session, get_settings())
        except Exception:  # the bucket, say: the jobs are deleted in a later round
            log.exception("deleting jobs past retention_days failed; trying again")
    if queues:
        _registered(lambda session: worker_registry.unregister(session, name))


def _registered(change) -> None:
    """Apply a change to the worker registry; a database hiccup only delays it to the next round."""
    try:
        with session_factory()() as session:
            change(session)
    except Exception:
        log.warning("could not update this worker's entry in the registry; trying again", exc_info=True)

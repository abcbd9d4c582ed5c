"""The job status machine, every change of a job's status from its creation on: each is one
conditional UPDATE, so two processes can never both move a job, and nothing leaves a terminal status
but a resume its owner asks for.

    queued ──claim──▶ running ──▶ succeeded | failed
      │                  │  ▲ (lost worker: back to queued while attempts remain)
      └──cancel──▶ cancelled ◀── cancelling ◀──cancel── running
    failed | cancelled ──resume──▶ queued (the next attempt continues from the newest checkpoint)

A status change and the event that announces it are committed together: a reader that sees the new
status (the event stream deciding it is done, say) also sees the event. Every outcome ends the job
through `_end`, which also commits the job's webhook delivery, if it has a webhook (app/webhooks.py):
one per job, never lost.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import crud, webhooks
from app.core.db import db_now
from app.models import CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING, TERMINAL, Job, JobEvent, User, WebhookDelivery


def _move(session: Session, job_id: str, from_: tuple[str, ...], *also, **values) -> bool:
    """Apply `values` if the job is in one of `from_` and the conditions `also` hold (not committed);
    True if it was."""
    result = session.execute(update(Job).where(Job.id == job_id, Job.status.in_(from_), *also).values(**values))
    return result.rowcount == 1


def _move_attempt(session: Session, job_id: str, attempt: int, from_: tuple[str, ...], *also, **values) -> bool:
    """Like `_move`, only while attempt `attempt` owns the job."""
    return _move(session, job_id, from_, Job.attempts == attempt, *also, **values)


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request body."""


class TooManyJobs(Exception):
    """The user already has as many queued or running jobs as they may."""


def create(
    session: Session,
    user: User,
    spec: dict,
    *,
    webhook_url: str | None = None,
    metadata: dict[str, str] | None = None,
    queue: str,
    total_steps: int,
    max_attempts: int,
    idempotency_key: str | None,
    max_active: int,
    key_lifetime: timedelta,
) -> tuple[Job, bool]:
    """A queued job, or the job this idempotency key created less than `key_lifetime` ago (False: not
    new). An older job lets go of its key, which then makes a new one. A new job past the user's
    `max_active` queued or running jobs raises TooManyJobs (a retry never does)."""
    request = {**spec, "notify": {"webhook_url": webhook_url}}  # the request as submitted, flat
    if metadata:  # only then: the hashes of requests from before metadata stay as they were
        request["metadata"] = metadata
    request_hash = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    if idempotency_key is not None:
        existing = session.scalar(select(Job).where(Job.user_id == user.id, Job.idempotency_key == idempotency_key))
        if existing is not None and existing.created_at < db_now(session) - key_lifetime:
            # Conditional, as two submits may both find it: the second's insert then meets the first's
            # new job in the unique key, and the retry below returns that one.
            session.execute(
                update(Job)
                .where(Job.id == existing.id, Job.idempotency_key == idempotency_key)
                .values(idempotency_key=None)
            )
        elif existing is not None:
            if existing.request_hash != request_hash:
                raise IdempotencyConflict(idempotency_key)
            return existing, False
    _room_for_one_more(session, user.id, max_active)
    job = Job(
        user_id=user.id,
        name=spec["name"],
        spec=spec,
        webhook_url=webhook_url,
        job_metadata=metadata or {},
        queue=queue,
        total_steps=total_steps,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # the same key, submitted concurrently: the other request won
        session.rollback()
        return create(
            session,
            user,
            spec,
            webhook_url=webhook_url,
            metadata=metadata,
            queue=queue,
            total_steps=total_steps,
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
            max_active=max_active,
            key_lifetime=key_lifetime,
        )
    crud.stage_event(session, job.id, "state", f"queued on {queue}", data={"state": QUEUED})
    session.commit()
    return job, True


def _room_for_one_more(session: Session, user_id: int, max_active: int) -> None:
    """Lock the user's row until the transaction ends, if they may have one more unfinished job; else
    TooManyJobs, the lock released."""
    crud.lock_user(session, user_id)
    if crud.active_jobs(session, user_id) >= max_active:
        session.rollback()
        raise TooManyJobs(max_active)


def claim(session: Session, job_id: str, worker: str, placement: dict | None = None) -> int | None:
    """Take a queued job for this worker; returns the attempt number, or None if someone else has it
    (a redelivered duplicate message, or a job cancelled while queued). `placement`: where it runs
    ({"kind", "devices"}, and "hosts" across a node group), kept on the job with the worker's name."""
    now = db_now(session)
    placement = {"worker": worker, **(placement or {})}
    attempt = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED)
        .values(
            status=RUNNING,
            attempts=Job.attempts + 1,
            worker=worker,
            heartbeat_at=now,
            started_at=now,
            placement=placement,
        )
        .returning(Job.attempts)
    ).scalar()
    if attempt is not None:
        devices = placement.get("devices")
        where = f"{worker}" + (f", {placement['kind']} {','.join(map(str, devices))}" if devices else "")
        where += f", across {', '.join(placement['hosts'])}" if placement.get("hosts") else ""
        crud.stage_event(
            session,
            job_id,
            "state",
            f"running (attempt {attempt}) on {where}",
            data={"state": RUNNING, "attempt": attempt, "placement": placement},
        )
    session.commit()
    return attempt


def heartbeat(session: Session, job_id: str, attempt: int) -> bool:
    """Record that attempt `attempt` is alive; False once the job has moved on without it."""
    alive = _move_attempt(session, job_id, attempt, (RUNNING, CANCELLING), heartbeat_at=db_now(session))
    session.commit()
    return alive


def _end(
    session: Session, job_id: str, from_: tuple[str, ...], *also, status: str, message: str, error: dict | None = None
) -> bool:
    """The one way a job ends (not committed): the terminal `status` with its time and `error`, the
    event that announces it and the job's webhook delivery, if the job is in one of `from_` and the
    conditions `also` hold. True if it ended."""
    if status not in TERMINAL:
        raise ValueError(f"a job ends succeeded, failed or cancelled, not {status!r}")
    values: dict = {"status": status, "finished_at": db_now(session)}
    if error:
        values.update(error_code=error.get("code"), error_message=error.get("message"))
    if not _move(session, job_id, from_, *also, **values):
        return False
    level = "error" if status == FAILED else "info"
    crud.stage_event(session, job_id, "state", message, level, {"state": status, "error": error})
    webhooks.stage_delivery(session, job_id)
    return True


def finish(
    session: Session, job_id: str, attempt: int, status: str, error: dict | None = None, message: str | None = None
) -> bool:
    """End attempt `attempt` with a terminal status (cancelled only from cancelling); `message` is
    the engine's own account of it (e.g. what a cancel interrupted)."""
    from_ = (CANCELLING,) if status == CANCELLED else (RUNNING, CANCELLING)
    message = message or (status if not error else f"{status}: {error.get('code')}: {error.get('message')}")
    ended = _end(session, job_id, from_, Job.attempts == attempt, status=status, message=message, error=error)
    session.commit()
    return ended


def _queue_again(session: Session, job: Job, attempt: int, why: str, *also) -> bool:
    """Put the running `job` back in the queue, ending attempt `attempt` (while the conditions `also`
    hold; not committed); its message is to be sent again. True if it was."""
    if not _move_attempt(session, job.id, attempt, (RUNNING,), *also, status=QUEUED, worker=None, published_at=None):
        return False
    crud.stage_event(
        session,
        job.id,
        "state",
        f"queued again: {why} (attempt {attempt} of {job.max_attempts})",
        "warning",
        {"state": QUEUED},
    )
    return True


def retry_or_fail(session: Session, job_id: str, attempt: int, error: dict) -> bool:
    """End attempt `attempt`, whose processes stopped without reporting an outcome (one was killed,
    crashed, or lost a peer), as retryable: the job is queued again while attempts remain (it resumes
    from its newest checkpoint), else it fails with `error`. True if it was queued again."""
    job = session.get(Job, job_id)
    if job.attempts < job.max_attempts and _queue_again(session, job, attempt, error["message"]):
        session.commit()
        return True
    finish(session, job_id, attempt, FAILED, error)
    return False


def request_cancel(session: Session, job_id: str) -> str | None:
    """Cancel: a queued job at once, a running one by asking its worker. Returns the new status,
    or None when the job had already ended."""
    if _end(session, job_id, (QUEUED,), status=CANCELLED, message="cancelled before it started"):
        session.commit()
        return CANCELLED
    if _move(session, job_id, (RUNNING,), status=CANCELLING):
        crud.stage_event(
            session, job_id, "state", "cancelling: the worker stops at the next step", data={"state": CANCELLING}
        )
        session.commit()
        return CANCELLING
    session.rollback()
    job = session.get(Job, job_id)
    return job.status if job and job.status == CANCELLING else None


def resume(session: Session, job_id: str, attempts: int, max_active: int) -> bool:
    """Queue a failed or cancelled job again, on its owner's request, with `attempts` more attempts: its
    next attempt continues from its newest checkpoint, as a retry does. The webhook delivery of the
    end it leaves is dropped (it ends again, and says so then). False if the job is in another status;
    TooManyJobs past the owner's `max_active` unfinished jobs (asked only of a job that may resume)."""
    status, user_id = session.execute(select(Job.status, Job.user_id).where(Job.id == job_id)).one()
    if status not in (FAILED, CANCELLED):  # and _move below asks again, in its update
        return False
    _room_for_one_more(session, user_id, max_active)
    again = _move(
        session,
        job_id,
        (FAILED, CANCELLED),
        status=QUEUED,
        max_attempts=Job.attempts + attempts,
        finished_at=None,
        error_code=None,
        error_message=None,
        eta_seconds=None,
        worker=None,
        published_at=None,
    )
    if not again:
        session.rollback()
        return False
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.job_id == job_id))
    crud.stage_event(session, job_id, "state", "queued again: resumed by its owner", data={"state": QUEUED})
    session.commit()
    return True


def reap_stale(session: Session, timeout: timedelta) -> list[str]:
    """Jobs whose worker stopped sending heartbeats: back to the queue while attempts remain, else
    failed (a job cancelled while its worker died ends cancelled). Returns the ids to enqueue again."""
    now = db_now(session)
    silent = Job.heartbeat_at < now - timeout
    stale = session.scalars(select(Job).where(Job.status.in_((RUNNING, CANCELLING)), silent)).all()
    requeue = []
    for job in stale:
        # Each update asks again whether the job is silent: a heartbeat committed since the query
        # above means its worker is alive, and the job must stay its.
        owned = (Job.attempts == job.attempts, silent)
        if job.status == CANCELLING:
            _end(session, job.id, (CANCELLING,), *owned, status=CANCELLED, message="cancelled (its worker was lost)")
        elif job.attempts < job.max_attempts:
            # The reason is read before the update, which clears the worker on this object too.
            if _queue_again(session, job, job.attempts, f"worker {job.worker} stopped responding", silent):
                requeue.append(job.id)
        else:
            error = {
                "code": "WorkerLost",
                "message": f"the worker stopped responding on all {job.max_attempts} attempts",
            }
            _end(session, job.id, (RUNNING,), *owned, status=FAILED, message=f"failed: {error['message']}", error=error)
        session.commit()
    return requeue


def mark_published(session: Session, job_id: str) -> None:
    """Record that a queued job's message reached the broker."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED, Job.published_at.is_(None))
        .values(published_at=db_now(session))
    )
    session.commit()


def unpublished(session: Session, grace: timedelta) -> list[tuple[str, str]]:
    """(id, queue) of queued jobs whose message was never sent, created more than `grace` ago
    (younger ones are being sent by the request that created them)."""
    rows = session.execute(
        select(Job.id, Job.queue).where(
            Job.status == QUEUED, Job.published_at.is_(None), Job.created_at < db_now(session) - grace
        )
    )
    return [(job_id, queue) for job_id, queue in rows]


def published_before(session: Session, grace: timedelta) -> list[tuple[str, str]]:
    """(id, queue) of queued jobs whose message was sent more than `grace` ago (and may be lost)."""
    rows = session.execute(
        select(Job.id, Job.queue).where(Job.status == QUEUED, Job.published_at < db_now(session) - grace)
    )
    return [(job_id, queue) for job_id, queue in rows]


def progress(session: Session, job_id: str) -> tuple[int, int]:
    """What moves while a job's processes work: its step and its newest event."""
    step = session.scalar(select(Job.step).where(Job.id == job_id))
    return step or 0, session.scalar(select(func.max(JobEvent.id)).where(JobEvent.job_id == job_id)) or 0


def is_active(session: Session, job_id: str, attempt: int) -> str | None:
    """The job's status if attempt `attempt` still owns it, else None (it was taken over or ended)."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.attempts != attempt or job.status not in (RUNNING, CANCELLING):
        return None
    return job.status


def hold(session: Session, job_id: str, attempt: int) -> str | None:
    """The job's status if attempt `attempt` still owns it, and then the job's row stays locked until
    the session commits; else None. Writes made in that transaction are atomic with the check: a
    check and a separate write would let the reaper hand the job to a new attempt in between, and the
    stale attempt then overwrite or delete the new one's rows. The update changes nothing; it is there
    for its lock (a row lock on PostgreSQL, the database's write lock on SQLite), which the reaper's
    and a claim's updates wait for."""
    return session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempts == attempt, Job.status.in_((RUNNING, CANCELLING)))
        .values(attempts=Job.attempts)
        .returning(Job.status)
    ).scalar()

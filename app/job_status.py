"""The job status machine: every change is one conditional UPDATE, so two processes can never both
move a job, and nothing leaves a terminal status.

    queued ──claim──▶ running ──▶ succeeded | failed
      │                  │  ▲ (lost worker: back to queued while attempts remain)
      └──cancel──▶ cancelled ◀── cancelling ◀──cancel── running

A status change and the event that announces it are committed together: a reader that sees the new
status (the event stream deciding it is done, say) also sees the event. A change to a terminal status
also commits the job's webhook delivery, if it has a webhook (app/webhooks.py): one per job, never lost.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app import crud, webhooks
from app.core.db import db_now
from app.models import CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING, TERMINAL, Job, JobEvent


def _move(session: Session, job_id: str, from_: tuple[str, ...], **values) -> bool:
    """Apply `values` if the job is in one of `from_` (not committed); True if it was."""
    result = session.execute(update(Job).where(Job.id == job_id, Job.status.in_(from_)).values(**values))
    return result.rowcount == 1


def _move_attempt(session: Session, job_id: str, attempt: int, from_: tuple[str, ...], *also, **values) -> bool:
    """Like `_move`, only while attempt `attempt` owns the job (and the conditions `also` hold)."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(from_), Job.attempts == attempt, *also).values(**values)
    )
    return result.rowcount == 1


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


def finish(
    session: Session, job_id: str, attempt: int, status: str, error: dict | None = None, message: str | None = None
) -> bool:
    """End attempt `attempt` with a terminal status (cancelled only from cancelling); `message` is
    the engine's own account of it (e.g. what a cancel interrupted)."""
    if status not in TERMINAL:
        raise ValueError(f"finish() takes a terminal status, not {status!r}")
    from_ = (CANCELLING,) if status == CANCELLED else (RUNNING, CANCELLING)
    values: dict = {"status": status, "finished_at": db_now(session)}
    if error:
        values.update(error_code=error.get("code"), error_message=error.get("message"))
    moved = _move_attempt(session, job_id, attempt, from_, **values)
    if moved:
        message = message or (status if not error else f"{status}: {error.get('code')}: {error.get('message')}")
        crud.stage_event(
            session,
            job_id,
            "state",
            message,
            "error" if status == FAILED else "info",
            {"state": status, "error": error},
        )
        webhooks.stage_delivery(session, job_id)
    session.commit()
    return moved


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
    if _move(session, job_id, (QUEUED,), status=CANCELLED, finished_at=db_now(session)):
        crud.stage_event(session, job_id, "state", "cancelled before it started", data={"state": CANCELLED})
        webhooks.stage_delivery(session, job_id)
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
        owned = (session, job.id, job.attempts)
        if job.status == CANCELLING:
            if _move_attempt(*owned, (CANCELLING,), silent, status=CANCELLED, finished_at=now):
                crud.stage_event(session, job.id, "state", "cancelled (its worker was lost)", data={"state": CANCELLED})
                webhooks.stage_delivery(session, job.id)
        elif job.attempts < job.max_attempts:
            # The reason is read before the update, which clears the worker on this object too.
            if _queue_again(session, job, job.attempts, f"worker {job.worker} stopped responding", silent):
                requeue.append(job.id)
        else:
            error = {
                "code": "WorkerLost",
                "message": f"the worker stopped responding on all {job.max_attempts} attempts",
            }
            if _move_attempt(
                *owned,
                (RUNNING,),
                silent,
                status=FAILED,
                finished_at=now,
                error_code=error["code"],
                error_message=error["message"],
            ):
                crud.stage_event(
                    session, job.id, "state", f"failed: {error['message']}", "error", {"state": FAILED, "error": error}
                )
                webhooks.stage_delivery(session, job.id)
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

"""Reads and writes of the service's tables. The job status machine lives here: every change is one
conditional UPDATE, so two processes can never both move a job, and nothing leaves a terminal status.

    queued ──claim──▶ running ──▶ succeeded | failed
      │                  │  ▲ (lost worker: back to queued while attempts remain)
      └──cancel──▶ cancelled ◀── cancelling ◀──cancel── running
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import datetime, timedelta

from sqlalchemy import DateTime, and_, func, or_, select, type_coerce, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .models import (
    CANCELLED,
    CANCELLING,
    FAILED,
    QUEUED,
    RUNNING,
    TERMINAL,
    ApiToken,
    Dataset,
    Job,
    JobEvent,
    User,
)

# -- users and tokens ---------------------------------------------------------------------------


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(session: Session, name: str, expires_in: timedelta | None = None) -> tuple[User, str]:
    """A new user and their first token (returned once; only its hash is stored)."""
    user = User(name=name)
    session.add(user)
    session.flush()
    return user, create_token(session, user, expires_in)


def create_token(session: Session, user: User, expires_in: timedelta | None = None) -> str:
    """A new token for `user`, valid until revoked or, with `expires_in`, until then."""
    token = "dst_" + secrets.token_urlsafe(32)
    expires_at = db_now(session) + expires_in if expires_in is not None else None
    session.add(ApiToken(user_id=user.id, token_hash=hash_token(token), expires_at=expires_at))
    session.commit()
    return token


def user_for_token(session: Session, token: str) -> User | None:
    """The user a token signs in, unless it was revoked or has expired (by the database's clock)."""
    live = and_(ApiToken.revoked_at.is_(None), or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > db_now(session)))
    return session.scalar(select(User).join(ApiToken).where(ApiToken.token_hash == hash_token(token), live))


def tokens_of(session: Session, user_name: str) -> list[ApiToken] | None:
    """A user's tokens, oldest first; None if there is no such user."""
    user = session.scalar(select(User).where(User.name == user_name))
    return None if user is None else list(session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)))


def revoke_token(session: Session, token_id: int) -> bool:
    """Revoke a token by its id; False if there is no such live token."""
    done = session.execute(update(ApiToken).where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None)).values(revoked_at=db_now(session)))
    session.commit()
    return done.rowcount == 1


# -- job status machine -------------------------------------------------------------------------


# A status change and the event that announces it are committed together: a reader that sees the
# new status (the event stream deciding it is done, say) also sees the event.


def _move(session: Session, job_id: str, from_: tuple[str, ...], **values) -> bool:
    """Apply `values` if the job is in one of `from_` (not committed); True if it was."""
    result = session.execute(update(Job).where(Job.id == job_id, Job.status.in_(from_)).values(**values))
    return result.rowcount == 1


def _move_attempt(session: Session, job_id: str, attempt: int, from_: tuple[str, ...], **values) -> bool:
    """Like `_move`, only while attempt `attempt` owns the job."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(from_), Job.attempts == attempt).values(**values)
    )
    return result.rowcount == 1


def _event(session: Session, job_id: str, type_: str, message: str, level: str = "info", data: dict | None = None) -> None:
    session.add(JobEvent(job_id=job_id, type=type_, level=level, message=message, data=data or {}))


def add_event(session: Session, job_id: str, type_: str, message: str, level: str = "info", data: dict | None = None) -> None:
    _event(session, job_id, type_, message, level, data)
    session.commit()


def db_now(session: Session) -> datetime:
    """The database's clock. Leases, heartbeats and timeouts are all read off this one clock: each
    machine's own would let a worker whose clock runs two minutes slow have its jobs reaped."""
    if session.get_bind().dialect.name == "sqlite":
        return session.scalar(select(type_coerce(func.strftime("%Y-%m-%d %H:%M:%f", "now"), DateTime(timezone=True))))
    return session.scalar(select(func.now()))


def claim(session: Session, job_id: str, worker: str) -> int | None:
    """Take a queued job for this worker; returns the attempt number, or None if someone else has it
    (a redelivered duplicate message, or a job cancelled while queued)."""
    now = db_now(session)
    attempt = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED)
        .values(status=RUNNING, attempts=Job.attempts + 1, worker=worker, heartbeat_at=now, started_at=now)
        .returning(Job.attempts)
    ).scalar()
    if attempt is not None:
        _event(session, job_id, "state", f"running (attempt {attempt}) on {worker}", data={"state": RUNNING, "attempt": attempt})
    session.commit()
    return attempt


def heartbeat(session: Session, job_id: str, attempt: int) -> bool:
    """Record that attempt `attempt` is alive; False once the job has moved on without it."""
    alive = _move_attempt(session, job_id, attempt, (RUNNING, CANCELLING), heartbeat_at=db_now(session))
    session.commit()
    return alive


def finish(session: Session, job_id: str, attempt: int, status: str, error: dict | None = None, message: str | None = None) -> bool:
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
        _event(session, job_id, "state", message, "error" if status == FAILED else "info", {"state": status, "error": error})
    session.commit()
    return moved


def request_cancel(session: Session, job_id: str) -> str | None:
    """Cancel: a queued job at once, a running one by asking its worker. Returns the new status,
    or None when the job had already ended."""
    if _move(session, job_id, (QUEUED,), status=CANCELLED, finished_at=db_now(session)):
        _event(session, job_id, "state", "cancelled before it started", data={"state": CANCELLED})
        session.commit()
        return CANCELLED
    if _move(session, job_id, (RUNNING,), status=CANCELLING):
        _event(session, job_id, "state", "cancelling: the worker stops at the next step", data={"state": CANCELLING})
        session.commit()
        return CANCELLING
    session.rollback()
    job = session.get(Job, job_id)
    return job.status if job and job.status == CANCELLING else None


def reap_stale(session: Session, timeout: timedelta) -> list[str]:
    """Jobs whose worker stopped sending heartbeats: back to the queue while attempts remain, else
    failed (a job cancelled while its worker died ends cancelled). Returns the ids to enqueue again."""
    now = db_now(session)
    stale = session.scalars(
        select(Job).where(Job.status.in_((RUNNING, CANCELLING)), Job.heartbeat_at < now - timeout)
    ).all()
    requeue = []
    for job in stale:
        where = dict(session=session, job_id=job.id, attempt=job.attempts)
        if job.status == CANCELLING:
            if _move_attempt(from_=(CANCELLING,), status=CANCELLED, finished_at=now, **where):
                _event(session, job.id, "state", "cancelled (its worker was lost)", data={"state": CANCELLED})
        elif job.attempts < job.max_attempts:
            if _move_attempt(from_=(RUNNING,), status=QUEUED, worker=None, published_at=None, **where):
                _event(session, job.id, "state", f"queued again: worker {job.worker} stopped responding "
                       f"(attempt {job.attempts} of {job.max_attempts})", "warning", {"state": QUEUED})  # fmt: skip
                requeue.append(job.id)
        else:
            error = {"code": "WorkerLost", "message": f"the worker stopped responding on all {job.max_attempts} attempts"}
            if _move_attempt(from_=(RUNNING,), status=FAILED, finished_at=now, error_code=error["code"],
                             error_message=error["message"], **where):  # fmt: skip
                _event(session, job.id, "state", f"failed: {error['message']}", "error", {"state": FAILED, "error": error})
        session.commit()
    return requeue


def mark_published(session: Session, job_id: str) -> None:
    """Record that a queued job's message reached the broker."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == QUEUED, Job.published_at.is_(None)).values(published_at=db_now(session)))
    session.commit()


def unpublished(session: Session, grace: timedelta) -> list[tuple[str, str]]:
    """(id, queue) of queued jobs whose message was never sent, created more than `grace` ago
    (younger ones are being sent by the request that created them)."""
    rows = session.execute(select(Job.id, Job.queue).where(
        Job.status == QUEUED, Job.published_at.is_(None), Job.created_at < db_now(session) - grace
    ))  # fmt: skip
    return [(job_id, queue) for job_id, queue in rows]


def is_active(session: Session, job_id: str, attempt: int) -> str | None:
    """The job's status if attempt `attempt` still owns it, else None (it was taken over or ended)."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.attempts != attempt or job.status not in (RUNNING, CANCELLING):
        return None
    return job.status




# -- jobs ---------------------------------------------------------------------------------------


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request body."""


class TooManyJobs(Exception):
    """The user already has as many queued or running jobs as they may."""


def create_job(session: Session, user: User, spec: dict, *, queue: str, total_steps: int, max_attempts: int,
               idempotency_key: str | None, max_active: int) -> tuple[Job, bool]:  # fmt: skip
    """A queued job, or the job this idempotency key already created (False: not new). A new job
    past the user's `max_active` queued or running jobs raises TooManyJobs (a retry never does)."""
    request_hash = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    if idempotency_key:
        existing = session.scalar(select(Job).where(Job.user_id == user.id, Job.idempotency_key == idempotency_key))
        if existing is not None:
            if existing.request_hash != request_hash:
                raise IdempotencyConflict(idempotency_key)
            return existing, False
    if active_jobs(session, user.id) >= max_active:
        raise TooManyJobs(max_active)
    job = Job(user_id=user.id, name=spec["name"], spec=spec, queue=queue, total_steps=total_steps,
              max_attempts=max_attempts, idempotency_key=idempotency_key, request_hash=request_hash)  # fmt: skip
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # the same key, submitted concurrently: the other request won
        session.rollback()
        return create_job(session, user, spec, queue=queue, total_steps=total_steps, max_attempts=max_attempts,
                          idempotency_key=idempotency_key, max_active=max_active)  # fmt: skip
    _event(session, job.id, "state", f"queued on {queue}", data={"state": QUEUED})
    session.commit()
    return job, True


def active_jobs(session: Session, user_id: int) -> int:
    """How many of a user's jobs are queued, running or cancelling."""
    return session.scalar(select(func.count()).select_from(Job).where(Job.user_id == user_id, Job.status.not_in(TERMINAL)))


def dataset_bytes(session: Session, user_id: int) -> int:
    """Bytes of datasets a user has uploaded and keeps."""
    return session.scalar(select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.user_id == user_id))


def list_jobs(session: Session, user_id: int, *, status: str | None, limit: int, after: str | None) -> tuple[list[Job], bool]:
    """Newest first; `after` is the id of the last job of the previous page."""
    query = select(Job).where(Job.user_id == user_id)
    if status:
        query = query.where(Job.status == status)
    if after:
        anchor = session.get(Job, after)
        if anchor is not None and anchor.user_id == user_id:
            query = query.where(or_(Job.created_at < anchor.created_at,
                                    and_(Job.created_at == anchor.created_at, Job.id < anchor.id)))  # fmt: skip
    jobs = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
    return list(jobs[:limit]), len(jobs) > limit

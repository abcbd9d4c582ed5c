"""Reads and writes of the service's tables, by name, for the API, the command line and the workers.
The job status machine, which moves jobs between statuses, is app/job_status.py."""

from __future__ import annotations

import hashlib
import secrets
from collections import defaultdict
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .core.db import db_clock, db_now
from .models import QUEUED, TERMINAL, ApiToken, Checkpoint, Dataset, EvalResult, Job, JobEvent, User

# -- users and tokens ---------------------------------------------------------------------------


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class NameTaken(Exception):
    """A user of that name exists already."""


def create_user(session: Session, name: str, expires_in: timedelta | None = None) -> tuple[User, str]:
    """A new user and their first token (returned once; only its hash is stored)."""
    user = User(name=name)
    session.add(user)
    try:
        session.flush()
    except IntegrityError:  # the unique name: asked by the database, so two creations at once cannot both win
        session.rollback()
        raise NameTaken(name) from None
    return user, create_token(session, user, expires_in)


def create_token(session: Session, user: User, expires_in: timedelta | None = None) -> str:
    """A new token for `user`, valid until revoked or, with `expires_in`, until then."""
    token = "dst_" + secrets.token_urlsafe(32)
    expires_at = db_now(session) + expires_in if expires_in is not None else None
    session.add(ApiToken(user_id=user.id, token_hash=hash_token(token), expires_at=expires_at))
    session.commit()
    return token


def _live(session: Session):
    """A token that was not revoked and has not expired (by the database's clock)."""
    return and_(
        ApiToken.revoked_at.is_(None), or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > db_clock(session))
    )


def user_for_token(session: Session, token: str) -> User | None:
    """The user a token signs in, unless it was revoked or has expired."""
    return session.scalar(select(User).join(ApiToken).where(ApiToken.token_hash == hash_token(token), _live(session)))


def live_token_id(session: Session, token: str) -> int | None:
    """The id of a live token: what a signed link made with it names."""
    return session.scalar(select(ApiToken.id).where(ApiToken.token_hash == hash_token(token), _live(session)))


def token_is_live(session: Session, token_id: int, user_id: int) -> bool:
    """Whether token `token_id` of user `user_id` still signs in: a link it made works only as long."""
    return (
        session.scalar(select(ApiToken.id).where(ApiToken.id == token_id, ApiToken.user_id == user_id, _live(session)))
        is not None
    )


def user_named(session: Session, name: str) -> User | None:
    return session.scalar(select(User).where(User.name == name))


def tokens_of(session: Session, user_name: str) -> list[ApiToken] | None:
    """A user's tokens, oldest first; None if there is no such user."""
    user = user_named(session, user_name)
    return (
        None
        if user is None
        else list(session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)))
    )


def revoke_token(session: Session, token_id: int) -> bool:
    """Revoke a token by its id; False if there is no such live token."""
    done = session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=db_now(session))
    )
    session.commit()
    return done.rowcount == 1


# -- job events ---------------------------------------------------------------------------------


def stage_event(
    session: Session, job_id: str, type_: str, message: str, level: str = "info", data: dict | None = None
) -> None:
    """Add an event to the session without committing: it commits with the change it announces."""
    session.add(JobEvent(job_id=job_id, type=type_, level=level, message=message, data=data or {}))


def add_event(
    session: Session, job_id: str, type_: str, message: str, level: str = "info", data: dict | None = None
) -> None:
    stage_event(session, job_id, type_, message, level, data)
    session.commit()


def events_after(session: Session, job_id: str, after: int, limit: int) -> list[JobEvent]:
    """Up to `limit` of a job's events after event id `after`, oldest first."""
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(limit)
    return list(session.scalars(query))


# -- jobs ---------------------------------------------------------------------------------------


def _unfinished(user_id: int):
    return (Job.user_id == user_id, Job.status.not_in(TERMINAL))


def active_jobs(session: Session, user_id: int) -> int:
    """How many of a user's jobs are queued, running or cancelling."""
    return session.scalar(select(func.count()).select_from(Job).where(*_unfinished(user_id)))


def unfinished_jobs(session: Session, user_id: int) -> list[Job]:
    """A user's queued, running and cancelling jobs: what a delete must not pull files from under."""
    return list(session.scalars(select(Job).where(*_unfinished(user_id))))


def list_jobs(
    session: Session, user_id: int, *, status: str | None, limit: int, after: str | None, metadata: dict[str, str]
) -> tuple[list[Job], bool]:
    """Newest first; `after` is the id of the last job of the previous page; `metadata`: pairs each job has."""
    query = select(Job).where(Job.user_id == user_id)
    if status:
        query = query.where(Job.status == status)
    for key, value in metadata.items():
        query = query.where(Job.job_metadata[key].as_string() == value)
    if after:
        anchor = session.get(Job, after)
        if anchor is not None and anchor.user_id == user_id:
            query = query.where(
                or_(Job.created_at < anchor.created_at, and_(Job.created_at == anchor.created_at, Job.id < anchor.id))
            )
    jobs = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
    return list(jobs[:limit]), len(jobs) > limit


def jobs_ahead(session: Session, jobs: Iterable[Job]) -> dict[str, int]:
    """For each queued job among `jobs`, how many queued jobs on its queue (anyone's) were submitted
    before it: roughly the order in which workers take them. One query, however many jobs."""
    queued = [job for job in jobs if job.status == QUEUED]
    if not queued:
        return {}
    ahead = func.row_number().over(partition_by=Job.queue, order_by=(Job.created_at, Job.id)) - 1
    ranked = (
        select(Job.id, ahead.label("ahead"))
        .where(Job.status == QUEUED, Job.queue.in_({j.queue for j in queued}))
        .subquery()
    )
    return dict(
        session.execute(select(ranked.c.id, ranked.c.ahead).where(ranked.c.id.in_([j.id for j in queued]))).all()
    )


def jobs_by_status(session: Session) -> dict[str, int]:
    """How many jobs there are in each status (statuses with none left out)."""
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())


def queue_depths(session: Session) -> dict[str, int]:
    """How many jobs wait in each queue (queues with none left out)."""
    return dict(session.execute(select(Job.queue, func.count()).where(Job.status == QUEUED).group_by(Job.queue)).all())


# -- what a job produced ------------------------------------------------------------------------


def metric_series(session: Session, job_id: str) -> dict[str, list[dict]]:
    """Each metric's series, from the job's metrics events: {name: [{step, value, stage}, ...]} in step
    order. A step run again (by an attempt that resumed from a checkpoint before it) has the values
    of its latest run: one point per step."""
    by_step = {}
    query = select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "metrics").order_by(JobEvent.id)
    for data in session.scalars(query):
        by_step[data["step"]] = data
    series: dict[str, list[dict]] = defaultdict(list)
    for step, data in sorted(by_step.items()):
        for name, value in data["values"].items():
            series[name].append({"step": step, "value": value, "stage": data.get("stage")})
    return series


def latest_metrics(session: Session, job_ids: list[str]) -> dict[str, dict]:
    """Each job's newest metrics, {job_id: {step, stage, name: value, ...}}, for those that have any."""
    newest = (
        select(func.max(JobEvent.id))
        .where(JobEvent.job_id.in_(job_ids), JobEvent.type == "metrics")
        .group_by(JobEvent.job_id)
    )
    return {
        event.job_id: {"step": event.data["step"], "stage": event.data.get("stage"), **event.data["values"]}
        for event in session.scalars(select(JobEvent).where(JobEvent.id.in_(newest)))
    }


def evals_of(session: Session, job_id: str) -> list[EvalResult]:
    """A job's evaluation results in the order they were recorded."""
    return list(session.scalars(select(EvalResult).where(EvalResult.job_id == job_id).order_by(EvalResult.id)))


def checkpoints_of(session: Session, job_id: str) -> list[Checkpoint]:
    """A job's checkpoints, oldest step first."""
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def best_checkpoint(job: Job, rows: list[Checkpoint]) -> Checkpoint | None:
    """Of a job's checkpoints (`rows`, oldest first), the one the engine chose as best (it records it in
    job.best_eval), else the latest."""
    step = (job.best_eval or {}).get("step")
    return next((c for c in rows if c.step == step), rows[-1] if rows else None)


def checkpoint_at(session: Session, job: Job, which: str) -> Checkpoint | None:
    """A job's checkpoint by `which`: `latest`, `best` or a step number (as text, from a URL or a spec)."""
    rows = checkpoints_of(session, job.id)
    if which == "latest":
        return rows[-1] if rows else None
    if which == "best":
        return best_checkpoint(job, rows)
    # "²" is a digit to str.isdigit, not to int(); steps fit in 32 bits, and int() refuses 4,300 digits.
    if which.isascii() and which.isdigit() and len(which) <= 10:
        return next((c for c in rows if c.step == int(which)), None)
    return None


# -- datasets -----------------------------------------------------------------------------------


class OverQuota(Exception):
    def __init__(self, left: int) -> None:
        super().__init__(left)
        self.left = left


def lock_user(session: Session, user_id: int) -> None:
    """Hold the user's row until the transaction ends, so that a limit of theirs (active jobs, dataset
    bytes) is checked and the new row inserted while no other request of theirs does the same: 30
    parallel submits against a limit of 20 made 27 jobs before. (SQLite, the embedded default, has one
    writer at a time already.)"""
    session.execute(select(User.id).where(User.id == user_id).with_for_update())


def add_dataset(session: Session, dataset: Dataset, max_bytes: int) -> Dataset:
    """Insert the upload if the user's datasets, it included, take at most `max_bytes` (else OverQuota)."""
    lock_user(session, dataset.user_id)
    used = dataset_bytes(session, dataset.user_id)
    if used + dataset.size_bytes > max_bytes:
        session.rollback()
        raise OverQuota(max(max_bytes - used, 0))
    session.add(dataset)
    session.commit()
    return dataset


def owned_dataset(session: Session, dataset_id: str, user_id: int) -> Dataset | None:
    """The upload `dataset_id` if user `user_id` owns it: a job may read only its owner's uploads."""
    dataset = session.get(Dataset, dataset_id)
    return dataset if dataset is not None and dataset.user_id == user_id else None


def datasets_of(session: Session, user_id: int) -> list[Dataset]:
    """A user's datasets, newest first."""
    return list(session.scalars(select(Dataset).where(Dataset.user_id == user_id).order_by(Dataset.created_at.desc())))


def dataset_bytes(session: Session, user_id: int) -> int:
    """Bytes of datasets a user has uploaded and keeps."""
    return session.scalar(select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.user_id == user_id))

"""Database tables (SQLAlchemy 2). The same schema runs on PostgreSQL and SQLite."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# A job's statuses live with what the API shows (app/schemas.py imports no SQLAlchemy, for the client);
# imported here too, where the code that reads and writes the tables has always found them.
from .schemas import CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL, JobStatus  # noqa: F401

# BIGINT keys on PostgreSQL; SQLite only auto-increments a column declared INTEGER.
BigId = BigInteger().with_variant(Integer, "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict: JSON, list: JSON}


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Where the user's jobs report their end, unless a job's request names another (notify.webhook_url).
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # Signs the user's webhooks (HMAC-SHA256). Kept as it is, not hashed: signing needs the secret
    # itself, as the receiver's check does; `distill users webhook` shows it when it is made.
    webhook_secret: Mapped[str | None] = mapped_column(String(100))


class ApiToken(Base):
    """Only the SHA-256 of a token is stored; the token itself is shown once, when created."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column()  # None: until revoked
    revoked_at: Mapped[datetime | None] = mapped_column()


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)
    num_records: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key", name="uq_jobs_user_idempotency_key"),
        Index("ix_jobs_user_created", "user_id", "created_at"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default=QUEUED, index=True)
    spec: Mapped[dict] = mapped_column()
    # Where the job's end is reported (its request's notify.webhook_url); else its user's default.
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # The request's metadata: string pairs its owner finds it by. (`metadata` is SQLAlchemy's own attribute.)
    job_metadata: Mapped[dict] = mapped_column("metadata", default=dict)
    queue: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    # When the job's message last reached the broker; None while a queued job's message has not been
    # sent (the broker was down at submit, or the reaper queued it again): the reaper sends it.
    published_at: Mapped[datetime | None] = mapped_column()
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(200))
    # Where the current (or last) attempt runs: {"worker", "kind": "gpu" | "cpu", "devices": [0, 1]}
    # (ordinals on the worker's host; none for a job spread over a hostfile's machines).
    placement: Mapped[dict | None] = mapped_column()
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer)
    eta_seconds: Mapped[float | None] = mapped_column(Float)
    best_eval: Mapped[dict | None] = mapped_column()
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))


class JobEvent(Base):
    """The single feed of what happened to a job: the events API, SSE and the CLI all read it. Each
    step's metrics are stored here and nowhere else (type `metrics`: step, stage, values)."""

    __tablename__ = "job_events"
    # (job_id, id): a job's events in order, and its newest (max(id)) in one lookup.
    __table_args__ = (
        Index("ix_job_events_job_id_id", "job_id", "id"),
        Index("ix_job_events_job_type_id", "job_id", "type", "id"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    type: Mapped[str] = mapped_column(String(20))
    level: Mapped[str] = mapped_column(String(10), default="info")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict] = mapped_column(default=dict)


class EvalResult(Base):
    __tablename__ = "evals"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(100))
    scores: Mapped[dict] = mapped_column()
    samples: Mapped[list] = mapped_column(default=list)  # [{prompt, reference, response}] (eval.samples)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    archive_path: Mapped[str] = mapped_column(Text)
    archive_size: Mapped[int] = mapped_column(BigInteger)
    archive_sha256: Mapped[str] = mapped_column(String(64))
    files: Mapped[list] = mapped_column()  # [{name, size, sha256}]
    scores: Mapped[dict | None] = mapped_column()  # eval at this step, if there was one
    storage_url: Mapped[str | None] = mapped_column(Text)  # s3://bucket/prefix/jobs/ID/ when copied to S3
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RegisteredWorker(Base):
    """A running `distill worker` and the queues it consumes. Its reaper thread refreshes `seen_at`
    (the database's clock) every heartbeat, so one that died without saying so ages out; the API
    reads this to tell a job that waits for a free worker from one that no worker would ever take."""

    __tablename__ = "workers"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid, as on the jobs it claims
    queues: Mapped[list] = mapped_column()  # ["gpu-1", "gpu-2"]
    started_at: Mapped[datetime] = mapped_column()
    seen_at: Mapped[datetime] = mapped_column(index=True)


class DeviceLease(Base):
    """A device of a machine held by a job's worker while it runs the job. The primary key makes a
    device of a host belong to one job at a time, however many workers run on that host; a lease whose
    worker is gone or whose job has ended is taken back by the next worker that needs it (worker/device_leases.py)."""

    __tablename__ = "device_leases"
    host: Mapped[str] = mapped_column(String(200), primary_key=True)
    device: Mapped[int] = mapped_column(Integer, primary_key=True)  # the device's ordinal on its host
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    worker: Mapped[str] = mapped_column(String(200))  # host:pid of the worker that holds it
    acquired_at: Mapped[datetime] = mapped_column()


class WebhookDelivery(Base):
    """The outbox of job-end webhooks: one row per finished job that has a webhook, added in the
    transaction that ends the job, sent by the reapers (app/webhooks.py). `pending` until the
    receiver answers 2xx (`delivered`) or every attempt has failed (`failed`); a sender claims a row
    by setting `claimed_until` in a conditional update, so two reapers never send it at once."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("whd"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)  # a job ends once
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict] = mapped_column()
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # rounds of sending, each of a few quick tries
    next_attempt_at: Mapped[datetime | None] = mapped_column()  # None: at once
    claimed_until: Mapped[datetime | None] = mapped_column()  # a sender holds it until then
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()

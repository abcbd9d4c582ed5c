"""What the API returns (requests are the engine's JobSpec, validated as such)."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from .models import Job


class Progress(BaseModel):
    step: int
    total_steps: int
    eta_seconds: float | None


class JobError(BaseModel):
    code: str | None
    message: str | None


class JobOut(BaseModel):
    id: str
    name: str
    status: str
    spec: dict
    queue: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    latest_metrics: dict
    best_eval: dict | None
    error: JobError | None
    attempts: int
    max_attempts: int

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(
            id=job.id, name=job.name, status=job.status, spec=job.spec, queue=job.queue, created_at=job.created_at,
            started_at=job.started_at, finished_at=job.finished_at,
            progress=Progress(step=job.step, total_steps=job.total_steps, eta_seconds=job.eta_seconds),
            latest_metrics=job.latest_metrics or {}, best_eval=job.best_eval,
            error=JobError(code=job.error_code, message=job.error_message) if job.error_code else None,
            attempts=job.attempts, max_attempts=job.max_attempts,
        )  # fmt: skip


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    created_at: datetime
    type: str
    level: str
    message: str
    data: dict


class EvalOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    step: int
    label: str
    scores: dict
    created_at: datetime


class CheckpointFile(BaseModel):
    name: str
    size: int
    sha256: str


class CheckpointOut(BaseModel):
    step: int
    created_at: datetime
    archive_size: int
    archive_sha256: str
    files: list[CheckpointFile]
    scores: dict | None
    latest: bool
    best: bool


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    num_records: int
    size_bytes: int
    sha256: str
    created_at: datetime

"""What the API takes and returns. A job request is the engine's JobSpec and, beside it, what only
the service does with a job (who is told when it ends, metadata to find it by). The answers are
defined with the client (distill_client.models), which parses them: one definition for both sides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, Field

from distill_client.models import (
    ERROR_TYPES,
    CheckpointFile,
    CheckpointOut,
    DatasetOut,
    Deleted,
    ErrorDetail,
    ErrorOut,
    EvalOut,
    EvalSamplesOut,
    EventOut,
    JobError,
    JobOut,
    MetricPoint,
    Notify,
    Page,
    Placement,
    Progress,
    Sample,
    WebhookOut,
    WebhookUrl,
    error_body,
)
from distill_client.status import TERMINAL, JobStatus
from worker.engine.spec import JobSpec

if TYPE_CHECKING:
    from .models import Job

__all__ = [
    "ERROR_TYPES",
    "TERMINAL",
    "CheckpointFile",
    "CheckpointOut",
    "DatasetOut",
    "Deleted",
    "ErrorDetail",
    "ErrorOut",
    "EvalOut",
    "EvalSamplesOut",
    "EventOut",
    "Health",
    "JobError",
    "JobOut",
    "JobRequest",
    "JobStatus",
    "MetricPoint",
    "Notify",
    "Page",
    "Placement",
    "Progress",
    "Readiness",
    "Sample",
    "SignedLink",
    "WebhookIn",
    "WebhookOut",
    "error_body",
    "field_errors_body",
    "job_out",
]

QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED = JobStatus


# A job's metadata: string pairs a client attaches to find its jobs again (a commit SHA, a pipeline run).
METADATA_KEY, METADATA_VALUE_CHARS = r"[A-Za-z0-9_.-]{1,64}", 256
MetadataKey = Annotated[str, Field(pattern=rf"^{METADATA_KEY}$")]
Metadata = Annotated[dict[MetadataKey, Annotated[str, Field(max_length=METADATA_VALUE_CHARS)]], Field(max_length=16)]


class JobRequest(JobSpec):
    """A job as submitted: its spec, and beside it the service's concerns, which the engine never sees
    and which do not shape what is trained. One flat document, so a spec file is a request as it is."""

    notify: Notify = Field(Notify(), description="Who is told when the job ends.")
    metadata: Metadata = Field(
        {},
        description="Up to 16 string pairs to find the job by (GET /jobs?metadata=KEY:VALUE), e.g. "
        '{"commit": "1a2b3c", "pipeline": "nightly"}; keys of letters, digits, _ . -.',
    )

    def split(self) -> tuple[JobSpec, Notify]:
        """The engine's spec (as a job stores it), and the service's part (with `metadata`)."""
        return JobSpec.model_validate(self.model_dump(exclude={"notify", "metadata"})), self.notify


def job_out(
    job: Job,
    latest_metrics: dict | None = None,
    queue_position: int | None = None,
    waiting_for: str | None = None,
) -> JobOut:
    """A job row as the API answers it."""
    return JobOut(
        id=job.id,
        name=job.name,
        status=job.status,
        spec=job.spec,
        notify=Notify(webhook_url=job.webhook_url),
        metadata=job.job_metadata,
        queue=job.queue,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        progress=Progress(step=job.step, total_steps=job.total_steps, eta_seconds=job.eta_seconds),
        latest_metrics=latest_metrics or {},
        best_eval=job.best_eval,
        error=JobError(code=job.error_code, message=job.error_message) if job.error_code else None,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        queue_position=queue_position,
        waiting_for=waiting_for,
        placement=Placement(**job.placement) if job.placement else None,
    )


class SignedLink(BaseModel):
    url: str = Field(
        description="The path with `expires`, `kid` and `signature`: it works without a token until it expires."
    )
    expires: int = Field(description="When the link stops working, in seconds since the Unix epoch.")


class WebhookIn(BaseModel):
    url: WebhookUrl = Field(..., description="Where your jobs report their end; null removes it.")
    new_secret: bool = Field(False, description="Make a new signing secret; the old one stops signing at once.")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    database: Literal["ok", "unavailable"]
    broker: Literal["ok", "unavailable"]


def field_errors_body(errors: list[dict]) -> dict:
    """An ErrorOut for a 422: pydantic's error for each bad field, and one line naming them all."""
    return {"message": "; ".join(_where(e["loc"]) + e["msg"] for e in errors), "detail": errors}


def _where(loc: list) -> str:
    """`training.steps: ` for ["body", "training", "steps"], `limit: ` for ["query", "limit"], nothing
    for ["body"] (the body as a whole: its message says what is wrong with it)."""
    where = ".".join(str(part) for part in loc[1:])
    return f"{where}: " if where else ""

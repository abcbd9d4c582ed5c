"""What the API takes and returns. A job request is the engine's JobSpec and, beside it, what only
the service does with a job (who is told when it ends).

The Python client (app/client.py) parses answers with these models, and a CI script installs it
without the `server` extra: so nothing here imports SQLAlchemy (or anything beyond pydantic) at
import time.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from worker.engine.spec import JobSpec
from worker.engine.status import TERMINAL, JobStatus  # noqa: F401 (TERMINAL: for app.models)

if TYPE_CHECKING:
    from .models import Job

QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED = JobStatus


def _webhook_url(value: str | None) -> str | None:
    """An absolute http(s) URL; where it may point (public addresses only, by default) is the
    service's check (app/webhooks.py), at submit and again when it is sent."""
    if value is None:
        return value
    parts = urlsplit(value)
    parts.port  # noqa: B018 - raises ValueError for a port out of range
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must not contain spaces or control characters")
    return value


# A webhook URL as job requests and PUT /me/webhook take it.
WebhookUrl = Annotated[Annotated[str, Field(max_length=2000)] | None, AfterValidator(_webhook_url)]


class Notify(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    webhook_url: WebhookUrl = Field(
        None,
        description="POST a signed JSON message here when the job ends (succeeded, failed or "
        "cancelled). Empty: the user's default webhook, if they have one (`distill webhook`).",
    )


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


class Progress(BaseModel):
    step: int
    total_steps: int
    eta_seconds: float | None


class JobError(BaseModel):
    code: str | None
    message: str | None


class Placement(BaseModel):
    worker: str = Field(description="The worker that runs (or last ran) the job: host:pid.")
    kind: str | None = Field(None, description="gpu or cpu: the kind of the devices it was given.")
    devices: list[int] | None = Field(
        None,
        description="Its devices on the worker's machine (CUDA ordinals on a GPU worker); a job across a node "
        "group holds all of them.",
    )
    hosts: list[str] | None = Field(
        None, description="The node group's machines its ranks run on; none on one machine."
    )


class JobOut(BaseModel):
    id: str
    name: str
    status: JobStatus
    spec: dict
    notify: Notify
    metadata: dict[str, str]
    queue: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    latest_metrics: dict = Field(description="The newest step's metrics: step, stage and each value.")
    best_eval: dict | None
    error: JobError | None
    attempts: int
    max_attempts: int
    placement: Placement | None = Field(None, description="Where the job runs, or last ran; none before it started.")
    queue_position: int | None = Field(
        None, description="While queued: how many queued jobs on the same queue were submitted before this one."
    )
    waiting_for: str | None = Field(
        None,
        description="While queued and no live worker consumes the job's queue: what it waits for, and how to start "
        "one.",
    )

    @classmethod
    def of(
        cls,
        job: Job,
        latest_metrics: dict | None = None,
        queue_position: int | None = None,
        waiting_for: str | None = None,
    ) -> JobOut:
        return cls(
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


class Sample(BaseModel):
    prompt: str = Field(description="The user's request, without the prompt template.")
    reference: str | None = Field(description="The set's gold response (the teacher's, where the teacher wrote them).")
    response: str = Field(description="What the evaluated model answered, sampled under the first seed.")


class EvalSamplesOut(BaseModel):
    """One evaluation's sample generations: the first `eval.samples` prompts of its set (the selection set for
    label `selection`, else the test set), the same prompts for every model and step."""

    model_config = ConfigDict(from_attributes=True)
    step: int
    label: str
    samples: list[Sample]


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


class Deleted(BaseModel):
    """What a DELETE answers: the id of what is gone."""

    id: str
    deleted: Literal[True] = True


class MetricPoint(BaseModel):
    step: int
    stage: str | None = Field(description="The stage the step belongs to (recovery stage, then the method).")
    value: float | None = Field(description="null where the value was not a finite number (a loss that became NaN).")


class SignedLink(BaseModel):
    url: str = Field(
        description="The path with `expires`, `kid` and `signature`: it works without a token until it expires."
    )
    expires: int = Field(description="When the link stops working, in seconds since the Unix epoch.")


class WebhookIn(BaseModel):
    url: WebhookUrl = Field(..., description="Where your jobs report their end; null removes it.")
    new_secret: bool = Field(False, description="Make a new signing secret; the old one stops signing at once.")


class WebhookOut(BaseModel):
    url: str | None
    has_secret: bool = Field(description="Whether messages can be signed: a job may name a webhook only then.")
    secret: str | None = Field(None, description="The signing secret (`whsec_...`), only in the answer that made it.")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    database: Literal["ok", "unavailable"]
    broker: Literal["ok", "unavailable"]


# The kind of an error that is not about one field, by status: stable words a program may branch on.
ERROR_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "content_too_large",
    416: "range_not_satisfiable",
    429: "too_many_requests",
    500: "internal_error",
}


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(
        description='Where the problem is, e.g. `["body", "training", "steps"]` or '
        '`["query", "limit"]`; empty when it is not about one field.'
    )
    msg: str
    type: str = Field(
        description="Its kind: pydantic's for a field (`missing`, `int_parsing`, `value_error`), else the "
        "status's (`not_found`, `conflict`, `too_many_requests`, ...)."
    )
    input: Any = Field(None, description="A field error's: the value refused.")
    ctx: dict | None = Field(None, description="A field error's: the limits it broke.")


class ErrorOut(BaseModel):
    """Every error the API answers, whatever its status: `message` for people, `detail` for programs.
    A 422 has one `detail` item per bad field, `loc` naming it; any other error has one, with an empty `loc`."""

    message: str = Field(description="One line that says what went wrong (each bad field, for a 422).")
    detail: list[ErrorDetail]


def error_body(status_code: int, message: str) -> dict:
    """An ErrorOut for an error that is not about one field: a missing job, a refused token, a limit."""
    return {"message": message, "detail": [{"loc": [], "msg": message, "type": ERROR_TYPES.get(status_code, "error")}]}


def field_errors_body(errors: list[dict]) -> dict:
    """An ErrorOut for a 422: pydantic's error for each bad field, and one line naming them all."""
    return {"message": "; ".join(_where(e["loc"]) + e["msg"] for e in errors), "detail": errors}


def _where(loc: list) -> str:
    """`training.steps: ` for ["body", "training", "steps"], `limit: ` for ["query", "limit"], nothing
    for ["body"] (the body as a whole: its message says what is wrong with it)."""
    where = ".".join(str(part) for part in loc[1:])
    return f"{where}: " if where else ""

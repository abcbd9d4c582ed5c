"""What the API answers: its response models, which the server publishes (app/schemas.py builds on
them) and the client parses answers with. Written for Python 3.9 (Optional, not `X | None`): pydantic
reads the annotations at run time."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, Optional, TypeVar, Union
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .status import JobStatus

# The spec's fields that may name a data file (data.train, ...): the client uploads local ones.
DATA_FILES = ("train", "selection", "eval", "pretrain")


def _webhook_url(value: Optional[str]) -> Optional[str]:
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
WebhookUrl = Annotated[Optional[Annotated[str, Field(max_length=2000)]], AfterValidator(_webhook_url)]


class Notify(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    webhook_url: WebhookUrl = Field(
        None,
        description="POST a signed JSON message here when the job ends (succeeded, failed or "
        "cancelled). Empty: the user's default webhook, if they have one (`distill webhook`).",
    )


class Progress(BaseModel):
    step: int
    total_steps: int
    eta_seconds: Optional[float]


class JobError(BaseModel):
    code: Optional[str]
    message: Optional[str]


class Placement(BaseModel):
    worker: str = Field(description="The worker that runs (or last ran) the job: host:pid.")
    kind: Optional[str] = Field(None, description="gpu or cpu: the kind of the devices it was given.")
    devices: Optional[list[int]] = Field(
        None,
        description="Its devices on the worker's machine (CUDA ordinals on a GPU worker); a job across a node "
        "group holds all of them.",
    )
    hosts: Optional[list[str]] = Field(
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
    started_at: Optional[datetime]
    finished_at: Optional[datetime]
    progress: Progress
    latest_metrics: dict = Field(description="The newest step's metrics: step, stage and each value.")
    best_eval: Optional[dict]
    error: Optional[JobError]
    attempts: int
    max_attempts: int
    placement: Optional[Placement] = Field(None, description="Where the job runs, or last ran; none before it started.")
    queue_position: Optional[int] = Field(
        None, description="While queued: how many queued jobs on the same queue were submitted before this one."
    )
    waiting_for: Optional[str] = Field(
        None,
        description="While queued and no live worker consumes the job's queue: what it waits for, and how to start "
        "one.",
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
    reference: Optional[str] = Field(
        description="The set's gold response (the teacher's, where the teacher wrote them)."
    )
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
    scores: Optional[dict]
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
    stage: Optional[str] = Field(description="The stage the step belongs to (recovery stage, then the method).")
    value: Optional[float] = Field(description="null where the value was not a finite number (a loss that became NaN).")


class WebhookOut(BaseModel):
    url: Optional[str]
    has_secret: bool = Field(description="Whether messages can be signed: a job may name a webhook only then.")
    secret: Optional[str] = Field(
        None, description="The signing secret (`whsec_...`), only in the answer that made it."
    )


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
    loc: list[Union[str, int]] = Field(
        description='Where the problem is, e.g. `["body", "training", "steps"]` or '
        '`["query", "limit"]`; empty when it is not about one field.'
    )
    msg: str
    type: str = Field(
        description="Its kind: pydantic's for a field (`missing`, `int_parsing`, `value_error`), else the "
        "status's (`not_found`, `conflict`, `too_many_requests`, ...)."
    )
    input: Any = Field(None, description="A field error's: the value refused.")
    ctx: Optional[dict] = Field(None, description="A field error's: the limits it broke.")


class ErrorOut(BaseModel):
    """Every error the API answers, whatever its status: `message` for people, `detail` for programs.
    A 422 has one `detail` item per bad field, `loc` naming it; any other error has one, with an empty `loc`."""

    message: str = Field(description="One line that says what went wrong (each bad field, for a 422).")
    detail: list[ErrorDetail]


def error_body(status_code: int, message: str) -> dict:
    """An ErrorOut for an error that is not about one field: a missing job, a refused token, a limit."""
    return {"message": message, "detail": [{"loc": [], "msg": message, "type": ERROR_TYPES.get(status_code, "error")}]}

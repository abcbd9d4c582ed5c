"""/api/v1/jobs: submit, list, inspect, cancel, follow, and download what a job produced."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from sqlalchemy import select

from app import crud
from app.api.deps import CurrentUser, DownloadableJob, OwnedJob, SessionDep, SettingsDep
from app.core.db import session_factory
from app.core.security import signed_url
from app.core.storage import s3_store
from app.models import QUEUED, STATUSES, TERMINAL, Checkpoint, Dataset, EvalResult, Job, JobEvent, Metric
from app.schemas import CheckpointOut, EvalOut, EventOut, JobOut, Page
from worker.celery_app import queue_for
from worker.engine.preflight import preflight
from worker.engine.spec import JobSpec
from worker.outbox import publish

router = APIRouter(prefix="/jobs", tags=["jobs"])
MAX_ID = 2**63 - 1  # ids are 64-bit columns; a larger bound overflows the driver (a 500 on SQLite)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut)
def submit(
    spec: JobSpec,
    session: SessionDep,
    user: CurrentUser,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    """Validate the spec fully (models, data, shapes) and queue the job. With an `Idempotency-Key`,
    repeating the same request returns the same job; the same key with another body is a 409."""

    def dataset_exists(dataset_id: str) -> bool:
        dataset = session.get(Dataset, dataset_id)
        return dataset is not None and dataset.user_id == user.id

    problems = preflight(spec, dataset_exists)
    if problems:
        raise RequestValidationError([{"loc": ("body", *loc), "msg": msg, "type": "value_error"} for loc, msg in problems])
    body = spec.model_dump(mode="json")
    try:
        job, _ = crud.create_job(session, user, body, queue=queue_for(body, settings), total_steps=spec.total_steps,
                                 max_attempts=settings.max_attempts, idempotency_key=idempotency_key,
                                 max_active=settings.max_active_jobs_per_user)  # fmt: skip
    except crud.IdempotencyConflict:
        raise HTTPException(status.HTTP_409_CONFLICT, "this Idempotency-Key was used with a different job spec") from None
    except crud.TooManyJobs:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            f"you have {settings.max_active_jobs_per_user} jobs queued or running, the most allowed; "
                            "wait for one to end or cancel one") from None  # fmt: skip
    if job.status == QUEUED and job.published_at is None:  # new, or a retry of a job whose message never went out
        if not publish(job.id, job.queue):
            crud.add_event(session, job.id, "log", "the broker did not answer; the job is stored and is sent to a "
                                                   "worker as soon as the broker is back", "warning")  # fmt: skip
        session.refresh(job)
    return JobOut.of(job)


@router.get("", response_model=Page[JobOut])
def list_jobs(
    session: SessionDep,
    user: CurrentUser,
    status_: Annotated[Literal[STATUSES] | None, Query(alias="status")] = None,  # type: ignore[valid-type]
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="id of the last job of the previous page")] = None,
) -> Page[JobOut]:
    jobs, has_more = crud.list_jobs(session, user.id, status=status_, limit=limit, after=after)
    return Page(data=[JobOut.of(j) for j in jobs], has_more=has_more)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job: OwnedJob) -> JobOut:
    return JobOut.of(job)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel(job: OwnedJob, session: SessionDep) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its next step, keeping its checkpoints."""
    if crud.request_cancel(session, job.id) is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} has already ended ({job.status})")
    session.refresh(job)
    return JobOut.of(job)


# -- events -------------------------------------------------------------------------------------


@router.get("/{job_id}/events", response_model=Page[EventOut])
def events(
    job: OwnedJob,
    session: SessionDep,
    after: Annotated[int, Query(ge=0, le=MAX_ID, description="id of the last event already seen")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> Page[EventOut]:
    rows = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.id > after).order_by(JobEvent.id).limit(limit + 1)
    ).all()
    return Page(data=[EventOut.model_validate(r) for r in rows[:limit]], has_more=len(rows) > limit)


@router.get("/{job_id}/events/stream", response_class=EventSourceResponse)
async def stream_events(
    job: OwnedJob,
    request: Request,
    last_event_id: Annotated[int | None, Header(ge=0, le=MAX_ID)] = None,
    after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
):
    """Server-sent events from the same table; reconnecting with Last-Event-ID resumes where it broke off.
    The stream ends once the job has ended and every event has been sent."""
    cursor, job_id, Session = last_event_id or after, job.id, session_factory()

    def read(after_id: int) -> tuple[list[JobEvent], bool]:
        with Session() as session:
            # Status first: a terminal status seen here was committed with its event, so the event
            # query below, which runs later, includes it.
            ended = session.get(Job, job_id).status in TERMINAL
            rows = session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id).limit(500)
            ).all()
            return list(rows), ended

    while not await request.is_disconnected():
        rows, ended = await asyncio.to_thread(read, cursor)  # blocking database I/O off the event loop
        for row in rows:
            cursor = row.id
            yield ServerSentEvent(data=EventOut.model_validate(row).model_dump(mode="json"), event=row.type, id=str(row.id))
        if not rows and ended:
            return
        if not rows:
            await asyncio.sleep(0.5)


# -- metrics and evals --------------------------------------------------------------------------


@router.get("/{job_id}/metrics")
def metrics(job: OwnedJob, session: SessionDep) -> dict[str, list[dict]]:
    """Each metric's series: {name: [{step, value}, ...]} in step order."""
    series: dict[str, list[dict]] = defaultdict(list)
    for row in session.scalars(select(Metric).where(Metric.job_id == job.id).order_by(Metric.step, Metric.id)):
        series[row.name].append({"step": row.step, "value": row.value})
    return series


@router.get("/{job_id}/evals", response_model=list[EvalOut])
def evals(job: OwnedJob, session: SessionDep) -> list[EvalOut]:
    rows = session.scalars(select(EvalResult).where(EvalResult.job_id == job.id).order_by(EvalResult.id))
    return [EvalOut.model_validate(r) for r in rows]


# -- checkpoints --------------------------------------------------------------------------------


def _checkpoints(session, job: Job) -> list[Checkpoint]:
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step)))


def _best(job: Job, rows: list[Checkpoint]) -> Checkpoint | None:
    """The checkpoint the engine chose as best (it records it in job.best_eval), else the latest."""
    step = (job.best_eval or {}).get("step")
    return next((c for c in rows if c.step == step), rows[-1] if rows else None)


@router.get("/{job_id}/checkpoints", response_model=list[CheckpointOut])
def checkpoints(job: OwnedJob, session: SessionDep) -> list[CheckpointOut]:
    rows = _checkpoints(session, job)
    best = _best(job, rows)
    return [
        CheckpointOut(step=c.step, created_at=c.created_at, archive_size=c.archive_size, archive_sha256=c.archive_sha256,
                      files=c.files, scores=c.scores, latest=c is rows[-1], best=c is best)  # fmt: skip
        for c in rows
    ]


def _checkpoint(session, job: Job, step: str) -> Checkpoint:
    rows = _checkpoints(session, job)
    found = rows[-1] if step == "latest" and rows else _best(job, rows) if step == "best" else None
    if step.isascii() and step.isdigit():  # "²" is a digit to str.isdigit, not to int()
        found = next((c for c in rows if c.step == int(step)), None)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} has no checkpoint {step!r}")
    return found


@router.get("/{job_id}/checkpoints/{step}/archive", response_class=FileResponse,
            responses={200: {"content": {"application/x-tar": {}}}, 206: {"description": "a byte range"}})  # fmt: skip
def archive(job: DownloadableJob, step: str, session: SessionDep) -> Response:
    """The checkpoint's Hugging Face directory as an uncompressed tar. Content-Length, ETag and Range
    requests let an interrupted download resume; X-Checksum-SHA256 is the whole archive's digest.
    With S3 storage, a redirect to a presigned URL that serves the same bytes."""
    c = _checkpoint(session, job, step)
    filename = f"{job.id}-step-{c.step}.tar"
    store = s3_store()
    if c.storage_url and store is not None:
        url = store.download_url(c.storage_url, f"archives/{Path(c.archive_path).name}", filename)
        return RedirectResponse(url, status.HTTP_307_TEMPORARY_REDIRECT, headers={"X-Checksum-SHA256": c.archive_sha256})
    return FileResponse(_on_disk(c.archive_path, c), media_type="application/x-tar", filename=filename,
                        headers={"X-Checksum-SHA256": c.archive_sha256})  # fmt: skip


@router.get("/{job_id}/checkpoints/{step}/files/{name}", response_class=FileResponse)
def checkpoint_file(job: DownloadableJob, step: str, name: str, session: SessionDep) -> Response:
    c = _checkpoint(session, job, step)
    entry = next((f for f in c.files if f["name"] == name), None)
    if entry is None:  # only listed names: never a path outside the checkpoint
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"checkpoint step {c.step} has no file {name!r}")
    store = s3_store()
    if c.storage_url and store is not None:
        url = store.download_url(c.storage_url, f"checkpoints/{Path(c.path).name}/{name}", name)
        return RedirectResponse(url, status.HTTP_307_TEMPORARY_REDIRECT, headers={"X-Checksum-SHA256": entry["sha256"]})
    return FileResponse(_on_disk(Path(c.path) / name, c), filename=name, headers={"X-Checksum-SHA256": entry["sha256"]})


def _on_disk(path: str | Path, c: Checkpoint) -> Path:
    """`path` if the file is still there; a 404 if it was removed behind the checkpoint's row."""
    if not Path(path).is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"the files of checkpoint step {c.step} are no longer in storage")
    return Path(path)


@router.post("/{job_id}/checkpoints/{step}/archive/link")
def archive_link(job: OwnedJob, step: str, request: Request, session: SessionDep) -> dict:
    """A signed URL of the archive that needs no token for a day: for browsers and download managers."""
    _checkpoint(session, job, step)
    url, expires = signed_url(request.url.path.removesuffix("/link"))
    return {"url": url, "expires": expires}


@router.post("/{job_id}/checkpoints/{step}/files/{name}/link")
def file_link(job: OwnedJob, step: str, name: str, request: Request, session: SessionDep) -> dict:
    """A signed URL of one checkpoint file that needs no token for a day."""
    c = _checkpoint(session, job, step)
    if not any(f["name"] == name for f in c.files):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"checkpoint step {c.step} has no file {name!r}")
    url, expires = signed_url(request.url.path.removesuffix("/link"))
    return {"url": url, "expires": expires}

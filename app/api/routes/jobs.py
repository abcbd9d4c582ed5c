"""/api/v1/jobs: submit, list, inspect, cancel, follow, and download what a job produced."""

from __future__ import annotations

import asyncio
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, RedirectResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from sqlalchemy.orm import Session

from app import acceptance, cleanup, crud, job_refs, job_status, webhooks, worker_registry
from app.api.deps import (
    NO_NUL,
    CurrentTokenId,
    CurrentUser,
    DownloadableJob,
    OwnedJob,
    SessionDep,
    SettingsDep,
    StreamSlot,
)
from app.api.errors import FileDownload, errors
from app.api.release import ReleasingRoute
from app.core import rate_limits
from app.core.broker import queue_for
from app.core.config import Settings
from app.core.db import session_factory
from app.core.path_roots import Roots
from app.core.security import signed_url
from app.core.storage import s3_store
from app.event_feed import event_feed
from app.job_paths import hide_server_paths, job_dir
from app.models import QUEUED, TERMINAL, Checkpoint, Job, JobEvent, JobStatus, User
from app.outbox import publish
from app.schemas import (
    METADATA_KEY,
    METADATA_VALUE_CHARS,
    CheckpointOut,
    Deleted,
    EvalOut,
    EvalSamplesOut,
    EventOut,
    JobOut,
    JobRequest,
    MetricPoint,
    Notify,
    Page,
    SignedLink,
    job_out,
)
from worker.engine.spec import JobSpec

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=ReleasingRoute)  # see app/api/release.py
MAX_ID = 2**63 - 1  # ids are 64-bit columns; a larger bound overflows the driver (a 500 on SQLite)
# What any route on one of the user's jobs may answer: no token, no such job (or another user's), a bad parameter.
ON_A_JOB = (401, 404, 422)
# A metadata filter, KEY:VALUE, by the rules of a job's metadata.
METADATA_PAIR = re.compile(rf"{METADATA_KEY}:[^\x00]{{0,{METADATA_VALUE_CHARS}}}")
# A download's body, described for generated clients (which save it as bytes).
BINARY = {"schema": {"type": "string", "format": "binary"}}
DOWNLOAD = {
    206: {"description": "The byte range the request's Range asked for."},
    307: {"description": "With S3 storage: a redirect to a presigned URL that serves the same bytes."},
    **errors(400, 401, 403, 404, 416, 422),
}


# 400: a body that cannot be read at all (not UTF-8), which FastAPI refuses before it parses the spec.
@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    name="create",
    responses=errors(400, 401, 409, 413, 422, 429),
)
def submit(
    request: JobRequest,
    session: SessionDep,
    user: CurrentUser,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> JobOut:
    """Validate the spec fully (models, data, shapes) and queue the job. With an `Idempotency-Key`,
    repeating the same request returns the same job; the same key with another body is a 409. A key
    names its job for DISTILL_IDEMPOTENCY_KEY_HOURS (24 h); after that, it makes a new job."""
    spec, notify, queue, served = _accept(request, session, user, settings)
    try:
        job, created = job_status.create(
            session,
            user,
            spec.model_dump(mode="json"),
            webhook_url=notify.webhook_url,
            metadata=request.metadata,
            queue=queue,
            total_steps=spec.total_steps,
            max_attempts=settings.max_attempts,
            idempotency_key=idempotency_key,
            max_active=settings.max_active_jobs_per_user,
            key_lifetime=timedelta(hours=settings.idempotency_key_hours),
        )
    except job_status.IdempotencyConflict:
        raise HTTPException(
            status.HTTP_409_CONFLICT, "this Idempotency-Key was used with a different job spec"
        ) from None
    except job_status.TooManyJobs:
        raise _too_many(settings) from None
    if created and queue not in served:  # accepted all the same: a worker for it may start later
        crud.add_event(session, job.id, "log", _unserved(queue), "warning", {"queue": queue})
    if job.status == QUEUED and job.published_at is None:  # new, or a retry of a job whose message never went out
        _send(session, job)
    return _out(session, settings, [job])[0]


def _too_many(settings: Settings) -> HTTPException:
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        f"you have {settings.max_active_jobs_per_user} jobs queued or running, the most allowed; "
        "wait for one to end or cancel one",
    )


def _send(session: Session, job: Job) -> None:
    """Send a queued job's message to the broker; if the broker does not answer, the reaper sends it later."""
    # publish() records the send in a session of its own: this request's connection goes back to
    # the pool first (a retry's read left it checked out), else each thread holds one connection
    # while waiting for a second, and 200 concurrent submits exhaust the pool (tests/chaos).
    session.commit()
    if not publish(job.id, job.queue):
        crud.add_event(
            session,
            job.id,
            "log",
            "the broker did not answer; the job is stored and is sent to a worker as soon as the broker is back",
            "warning",
        )
    session.refresh(job)


@router.post("/validate", response_model=JobRequest, responses=errors(400, 401, 413, 422))
def validate(request: JobRequest, session: SessionDep, user: CurrentUser, settings: SettingsDep) -> JobRequest:
    """Run every check submit runs and queue nothing: the request as submit would take it (defaults
    filled in), or the 422 submit would answer."""
    _accept(request, session, user, settings)
    return request


def _accept(
    request: JobRequest, session: Session, user: User, settings: Settings
) -> tuple[JobSpec, Notify, str, set[str]]:
    """The checks a request passes before it is queued: the spec's (app/acceptance.py, against what
    this API may read), its webhook's, and, where the server refuses them, a queue no live worker
    serves. A 422 naming each bad field; else the spec, its notification, its queue, and the queues
    live workers serve. Each is counted against the user's submit_limit first (the checks read files)."""
    rate_limits.hit(settings.rate_limit_storage, settings.submit_limit, "job submissions", f"submit:{user.id}")

    def upload(dataset_id: str) -> str | None:
        dataset = crud.owned_dataset(session, dataset_id, user.id)
        return None if dataset is None else dataset.path

    def checkpoint(ref: str) -> str | None:
        found = job_refs.checkpoint_of(session, ref, user.id)
        return None if found is None else found.path

    spec, notify = request.split()
    reader = acceptance.Reader(Roots.of(settings), settings.api_sees_worker_files, upload, checkpoint)
    _, problems = acceptance.check(spec, reader)
    problems += webhooks.spec_problems(notify.webhook_url, user, settings)
    if (asked := spec.resources.max_run_minutes) is not None and asked > settings.max_run_minutes:
        problems.append(
            (
                ("resources", "max_run_minutes"),
                f"at most {settings.max_run_minutes:g} on this service (DISTILL_MAX_RUN_MINUTES)",
            )
        )
    if problems:
        raise RequestValidationError(
            [{"loc": ("body", *loc), "msg": msg, "type": "value_error"} for loc, msg in problems]
        )
    served = worker_registry.served_queues(session, _liveness(settings))
    queue = queue_for(spec.model_dump(mode="json"), served)
    if queue not in served and settings.refuse_unserved_queues:
        offered = f"queues served now: {', '.join(sorted(served))}" if served else "no worker is running"
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "resources"),
                    "type": "value_error",
                    "msg": f"{_unserved(queue)}; this server refuses such jobs ({offered})",
                }
            ]
        )
    return spec, notify, queue, served


@router.get("", response_model=Page[JobOut], name="list", responses=errors(401, 422))
def list_jobs(
    session: SessionDep,
    user: CurrentUser,
    settings: SettingsDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(max_length=64, pattern=NO_NUL, description="id of the last job of the previous page")
    ] = None,
    metadata: Annotated[
        list[str],
        Query(max_length=16, description="Only jobs whose metadata has KEY with VALUE, as KEY:VALUE; repeatable."),
    ] = [],
) -> Page[JobOut]:
    if not all(METADATA_PAIR.fullmatch(pair) for pair in metadata):
        raise RequestValidationError(
            [
                {
                    "loc": ("query", "metadata"),
                    "msg": "each must be KEY:VALUE, as a job's metadata",
                    "type": "value_error",
                }
            ]
        )
    pairs = dict(pair.split(":", 1) for pair in metadata)
    jobs, has_more = crud.list_jobs(session, user.id, status=status_, limit=limit, after=after, metadata=pairs)
    return Page(data=_out(session, settings, jobs), has_more=has_more)


@router.get("/{job_id}", response_model=JobOut, name="retrieve", responses=errors(*ON_A_JOB))
def get_job(job: OwnedJob, session: SessionDep, settings: SettingsDep) -> JobOut:
    return _out(session, settings, [job])[0]


@router.post("/{job_id}/cancel", response_model=JobOut, responses=errors(*ON_A_JOB, 409))
def cancel(job: OwnedJob, session: SessionDep, settings: SettingsDep) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its next step, keeping its checkpoints."""
    if job_status.request_cancel(session, job.id) is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} has already ended ({job.status})")
    session.refresh(job)
    return _out(session, settings, [job])[0]


@router.post("/{job_id}/resume", response_model=JobOut, responses=errors(*ON_A_JOB, 409, 429))
def resume(job: OwnedJob, session: SessionDep, settings: SettingsDep) -> JobOut:
    """Continue a failed or cancelled job: queued again with DISTILL_MAX_ATTEMPTS more attempts, the next
    of which resumes from its newest checkpoint (from the start if it has none). A 409 for a job that
    has not ended or has succeeded."""
    try:
        resumed = job_status.resume(session, job.id, settings.max_attempts, settings.max_active_jobs_per_user)
    except job_status.TooManyJobs:
        raise _too_many(settings) from None
    if not resumed:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"job {job.id} is {job.status}: only a failed or cancelled job resumes"
        )
    _send(session, job)
    return _out(session, settings, [job])[0]


@router.delete("/{job_id}", response_model=Deleted, name="delete", responses=errors(*ON_A_JOB, 409))
def delete_job(job: OwnedJob, session: SessionDep, settings: SettingsDep) -> Deleted:
    """Delete a finished job (succeeded, failed or cancelled) with everything it wrote: its events,
    evaluations, checkpoints, log, files and objects in the bucket. A 409 while it is queued or running:
    cancel it first."""
    try:
        cleanup.delete_job(session, settings, job.id)
    except cleanup.InUse as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
    return Deleted(id=job.id)


def _liveness(settings: Settings) -> timedelta:
    """A worker counts as serving its queues while it refreshed its registration this recently:
    as long as a running job may go without a heartbeat before it is taken up again."""
    return timedelta(seconds=settings.heartbeat_timeout_seconds)


def _unserved(queue: str) -> str:
    return f"no worker serves queue {queue}; start one with `distill worker --queues {queue}`"


def _out(session: Session, settings: Settings, jobs: list[Job]) -> list[JobOut]:
    """The jobs as the API shows them; a queued one with its place in its queue, and what it waits
    for when no live worker consumes that queue."""
    ahead = crud.jobs_ahead(session, jobs)
    served = worker_registry.served_queues(session, _liveness(settings)) if ahead else set()
    latest = crud.latest_metrics(session, [job.id for job in jobs])
    return [
        job_out(
            job,
            latest.get(job.id),
            queue_position=ahead.get(job.id),
            waiting_for=_unserved(job.queue) if job.id in ahead and job.queue not in served else None,
        )
        for job in jobs
    ]


# -- events -------------------------------------------------------------------------------------


@router.get("/{job_id}/events", response_model=Page[EventOut], responses=errors(*ON_A_JOB))
def events(
    job: OwnedJob,
    session: SessionDep,
    after: Annotated[int, Query(ge=0, le=MAX_ID, description="id of the last event already seen")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> Page[EventOut]:
    rows = crud.events_after(session, job.id, after, limit + 1)
    return Page(data=[EventOut.model_validate(r) for r in rows[:limit]], has_more=len(rows) > limit)


# How long a stream waits on the event feed before it reads for itself: the feed wakes it within a
# second of a new event; this bounds the wait where the feed cannot read the database.
STREAM_FALLBACK_SECONDS = 10


@router.get("/{job_id}/events/stream", response_class=EventSourceResponse, responses=errors(*ON_A_JOB, 429))
async def stream_events(
    job: OwnedJob,
    _slot: StreamSlot,
    request: Request,
    last_event_id: Annotated[int | None, Header(ge=0, le=MAX_ID)] = None,
    after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
):
    """Server-sent events from the same table; reconnecting with Last-Event-ID resumes where it broke off.
    The stream ends once the job has ended and every event has been sent. A user may hold
    DISTILL_MAX_STREAMS_PER_USER streams open at once on one API process; one more is a 429."""
    cursor, job_id, Session = last_event_id or after, job.id, session_factory()

    def read(after_id: int) -> tuple[list[JobEvent], bool]:
        with Session() as session:
            # Status first: a terminal status seen here was committed with its event, so the event
            # query below, which runs later, includes it.
            ended = session.get(Job, job_id).status in TERMINAL
            return crud.events_after(session, job_id, after_id, 500), ended

    while not await request.is_disconnected():
        rows, ended = await asyncio.to_thread(read, cursor)  # blocking database I/O off the event loop
        for row in rows:
            cursor = row.id
            yield ServerSentEvent(
                data=EventOut.model_validate(row).model_dump(mode="json"), event=row.type, id=str(row.id)
            )
        if not rows and ended:
            return
        if not rows:  # nothing new: wait for the feed to see some (every stream of this process, one query)
            await event_feed().wait(job_id, cursor, timeout=STREAM_FALLBACK_SECONDS)


# -- the training process's output --------------------------------------------------------------

LOG_BYTES = 4 * 1024 * 1024  # the most of a log one answer holds: its end, where a failure shows


@router.get(
    "/{job_id}/logs",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}}, **errors(*ON_A_JOB)},
)
def logs(
    job: OwnedJob,
    settings: SettingsDep,
    attempt: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="which attempt's log; default: the latest")
    ] = None,
    tail: Annotated[int | None, Query(ge=1, le=MAX_ID, description="only the last N lines")] = None,
) -> PlainTextResponse:
    """What the training process of an attempt printed (its stdout and stderr), with the server's
    folders hidden as in events. A log over 4 MiB is answered with its last 4 MiB, after a line that
    says how much was left out."""
    if not job.attempts:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} has not started: it has no log yet")
    attempt = attempt or job.attempts
    path = job_dir(settings, job.id) / f"attempt-{attempt}.log"
    if attempt > job.attempts or not path.is_file():
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"job {job.id} has no log of attempt {attempt} "
            f"(it has had {job.attempts}; a log lives on the machine that ran the attempt)",
        )
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - LOG_BYTES))
        data = f.read(LOG_BYTES)
    if size > len(data) and b"\n" in data:  # cut: drop the partial first line
        data = data[data.index(b"\n") + 1 :]
    lines = data.decode(errors="replace").splitlines(keepends=True)
    if tail is not None and tail < len(lines):
        lines = lines[-tail:]
    elif size > len(data):
        lines.insert(
            0, f"[the first {size - len(data)} bytes of this log are left out: an answer holds its last {LOG_BYTES}]\n"
        )
    return PlainTextResponse(hide_server_paths("".join(lines), settings, job.id))


# -- metrics and evals --------------------------------------------------------------------------


@router.get("/{job_id}/metrics", response_model=dict[str, list[MetricPoint]], responses=errors(*ON_A_JOB))
def metrics(job: OwnedJob, session: SessionDep) -> dict[str, list[dict]]:
    """Each metric's series: {name: [{step, value, stage}, ...]} in step order (the same values the
    event stream carries in its `metrics` events)."""
    return crud.metric_series(session, job.id)


@router.get("/{job_id}/evals", response_model=list[EvalOut], responses=errors(*ON_A_JOB))
def evals(job: OwnedJob, session: SessionDep) -> list[EvalOut]:
    return [EvalOut.model_validate(r) for r in crud.evals_of(session, job.id)]


@router.get("/{job_id}/samples", response_model=list[EvalSamplesOut], responses=errors(*ON_A_JOB))
def samples(job: OwnedJob, session: SessionDep) -> list[EvalSamplesOut]:
    """The sample generations of each evaluation that kept some, in the order they were recorded."""
    return [EvalSamplesOut.model_validate(r) for r in crud.evals_of(session, job.id) if r.samples]


# -- checkpoints --------------------------------------------------------------------------------


@router.get("/{job_id}/checkpoints", response_model=list[CheckpointOut], responses=errors(*ON_A_JOB))
def checkpoints(job: OwnedJob, session: SessionDep) -> list[CheckpointOut]:
    rows = crud.checkpoints_of(session, job.id)
    best = crud.best_checkpoint(job, rows)
    return [
        CheckpointOut(
            step=c.step,
            created_at=c.created_at,
            archive_size=c.archive_size,
            archive_sha256=c.archive_sha256,
            files=c.files,
            scores=c.scores,
            latest=c is rows[-1],
            best=c is best,
        )
        for c in rows
    ]


def _checkpoint(session, job: Job, step: str) -> Checkpoint:
    found = crud.checkpoint_at(session, job, step)
    if found is None:
        shown = step if len(step) <= 40 else step[:40] + "…"
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} has no checkpoint {shown!r}")
    return found


@router.get(
    "/{job_id}/checkpoints/{step}/archive",
    response_class=FileDownload,
    responses={200: {"content": {"application/x-tar": BINARY}}, **DOWNLOAD},
)
def archive(job: DownloadableJob, step: str, session: SessionDep) -> Response:
    """The checkpoint's Hugging Face directory as an uncompressed tar. Content-Length, ETag and Range
    requests let an interrupted download resume; X-Checksum-SHA256 is the whole archive's digest.
    With S3 storage, a redirect to a presigned URL that serves the same bytes."""
    c = _checkpoint(session, job, step)
    filename = f"{job.id}-step-{c.step}.tar"
    store = s3_store()
    if c.storage_url and store is not None:
        url = store.download_url(c.storage_url, f"archives/{Path(c.archive_path).name}", filename)
        return RedirectResponse(
            url, status.HTTP_307_TEMPORARY_REDIRECT, headers={"X-Checksum-SHA256": c.archive_sha256}
        )
    return FileDownload(
        _on_disk(c.archive_path, c),
        media_type="application/x-tar",
        filename=filename,
        headers={"X-Checksum-SHA256": c.archive_sha256},
    )


@router.get(
    "/{job_id}/checkpoints/{step}/files/{name}",
    response_class=FileDownload,
    responses={200: {"content": {"application/octet-stream": BINARY}}, **DOWNLOAD},
)
def checkpoint_file(job: DownloadableJob, step: str, name: str, session: SessionDep) -> Response:
    c = _checkpoint(session, job, step)
    entry = next((f for f in c.files if f["name"] == name), None)
    if entry is None:  # only listed names: never a path outside the checkpoint
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"checkpoint step {c.step} has no file {name!r}")
    store = s3_store()
    if c.storage_url and store is not None:
        url = store.download_url(c.storage_url, f"checkpoints/{Path(c.path).name}/{name}", name)
        return RedirectResponse(url, status.HTTP_307_TEMPORARY_REDIRECT, headers={"X-Checksum-SHA256": entry["sha256"]})
    return FileDownload(_on_disk(Path(c.path) / name, c), filename=name, headers={"X-Checksum-SHA256": entry["sha256"]})


def _on_disk(path: str | Path, c: Checkpoint) -> Path:
    """`path` if the file is still there; a 404 if it was removed behind the checkpoint's row."""
    if not Path(path).is_file():
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"the files of checkpoint step {c.step} are no longer in storage"
        )
    return Path(path)


@router.post("/{job_id}/checkpoints/{step}/archive/link", response_model=SignedLink, responses=errors(*ON_A_JOB))
def archive_link(job: OwnedJob, step: str, request: Request, session: SessionDep, tid: CurrentTokenId) -> SignedLink:
    """A signed URL of the archive that needs no token for a day (or until this request's token is
    revoked): for browsers and download managers."""
    _checkpoint(session, job, step)
    url, expires = signed_url(request.url.path.removesuffix("/link"), tid)
    return SignedLink(url=url, expires=expires)


@router.post("/{job_id}/checkpoints/{step}/files/{name}/link", response_model=SignedLink, responses=errors(*ON_A_JOB))
def file_link(
    job: OwnedJob, step: str, name: str, request: Request, session: SessionDep, tid: CurrentTokenId
) -> SignedLink:
    """A signed URL of one checkpoint file that needs no token for a day (or until this request's token
    is revoked)."""
    c = _checkpoint(session, job, step)
    if not any(f["name"] == name for f in c.files):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"checkpoint step {c.step} has no file {name!r}")
    url, expires = signed_url(request.url.path.removesuffix("/link"), tid)
    return SignedLink(url=url, expires=expires)

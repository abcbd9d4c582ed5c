"""/api/v1/datasets: upload a training or evaluation set (JSONL, Parquet or Arrow), checked record by record."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import cleanup, crud
from app.api.deps import NO_NUL, CurrentUser, ResourceId, SessionDep, SettingsDep, release_connection
from app.api.errors import errors
from app.api.release import ReleasingRoute
from app.core import rate_limits, slots
from app.core.config import Settings
from app.core.storage import s3_store
from app.job_paths import dataset_file
from app.models import Dataset, User, new_id
from app.schemas import DatasetOut, Deleted
from worker.engine.corpus import is_text_jsonl, iter_text_records
from worker.engine.data import TABLE_SUFFIXES, DataError, count_table_rows, iter_records

log = logging.getLogger(__name__)
router = APIRouter(prefix="/datasets", tags=["datasets"], route_class=ReleasingRoute)  # see app/api/release.py


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    responses=errors(401, 408, 413, 422, 429, 503),
    openapi_extra={
        "requestBody": {
            "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
                "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
            }
        }
    },
)
async def upload(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    settings: SettingsDep,
    name: Annotated[str, Query(min_length=1, max_length=200, pattern=NO_NUL)],
) -> DatasetOut:
    """The request body is the file itself (`curl --data-binary @train.jsonl`): JSONL, or where `name`
    ends in .parquet or .arrow, a Parquet or Arrow file (Hugging Face datasets' to_parquet, say).
    Records use Dolly's layout (instruction, input, output), prompt/response or chat `messages`; a bad
    line or row is named by number. A job refers to the upload as `dataset:ID` in data.train,
    data.selection or data.eval (with data.columns for other column names); a JSONL upload of
    {"text": ...} records is a pretraining corpus, for data.pretrain."""
    rate_limits.hit(settings.rate_limit_storage, settings.upload_limit, "uploads", f"upload:{user.id}")
    try:
        with slots.slot(("upload", user.id), settings.max_uploads_per_user):
            return await _receive(request, session, user, settings, name)
    except slots.TooMany:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"you are sending {settings.max_uploads_per_user} uploads already, the most allowed "
            "(max_uploads_per_user); wait for one to finish",
        ) from None


async def _receive(request: Request, session: Session, user: User, settings: Settings, name: str) -> DatasetOut:
    dataset_id = new_id("ds")
    path, digest, size = dataset_file(settings, dataset_id, name), hashlib.sha256(), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial" + path.suffix)  # the suffix the engine reads it by
    # No database connection is held while the client sends (20 stalled uploads held every one, and
    # froze the service): the quota is read first, an early answer, and checked again at the insert.
    room = settings.max_dataset_bytes_per_user - await run_in_threadpool(_bytes_used, session, user.id)
    chunks = aiter(request.stream())
    try:
        with partial.open("wb") as out:
            while (chunk := await _next_chunk(chunks, settings.upload_idle_seconds)) is not None:
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise HTTPException(
                        status.HTTP_413_CONTENT_TOO_LARGE, f"datasets are limited to {settings.max_upload_bytes} bytes"
                    )
                if size > room:
                    raise _over_quota(settings, room)
                digest.update(chunk)
                out.write(chunk)
        # Parsing a large file takes seconds: in a worker thread, so other requests are served meanwhile.
        num_records = await run_in_threadpool(_count_records, partial)
    except (DataError, UnicodeDecodeError) as err:
        partial.unlink()
        message = str(err).replace(str(partial), name)
        raise RequestValidationError([{"loc": ("body",), "msg": message, "type": "value_error"}]) from None
    except BaseException:  # too large, stalled, the client gone mid-upload, anything else: no partial file stays
        partial.unlink(missing_ok=True)
        raise
    partial.rename(path)
    if (store := s3_store()) is not None:  # for workers on machines without this artifacts folder
        try:
            await run_in_threadpool(store.upload, store.datasets_url(), path.name, path)
        except Exception:  # boto3 raises many types
            path.unlink()
            log.warning("could not copy dataset %s to the bucket", dataset_id, exc_info=True)
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                "the upload could not be stored in the bucket; nothing was kept, try again",
            ) from None
    dataset = Dataset(
        id=dataset_id,
        user_id=user.id,
        name=name,
        path=str(path),
        num_records=num_records,
        size_bytes=size,
        sha256=digest.hexdigest(),
    )
    try:
        await run_in_threadpool(crud.add_dataset, session, dataset, settings.max_dataset_bytes_per_user)
    except crud.OverQuota as over:  # uploads sent in parallel: together they would pass the quota
        path.unlink()
        if store is not None:
            await run_in_threadpool(store.delete, store.datasets_url(), [path.name])
        raise _over_quota(settings, over.left) from None
    return DatasetOut.model_validate(dataset)


def _bytes_used(session: Session, user_id: int) -> int:
    used = crud.dataset_bytes(session, user_id)
    release_connection(session)
    return used


async def _next_chunk(chunks, idle_seconds: float) -> bytes | None:
    """The body's next chunk; None at its end; a 408 when the client sends nothing for `idle_seconds`."""
    try:
        return await asyncio.wait_for(anext(chunks), idle_seconds)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise HTTPException(
            status.HTTP_408_REQUEST_TIMEOUT, f"the upload stalled: nothing arrived for {idle_seconds:g} seconds"
        ) from None


def _over_quota(settings: Settings, left: int) -> HTTPException:
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        f"your datasets may take {settings.max_dataset_bytes_per_user} bytes in all and {max(left, 0)} are left",
    )


def _count_records(path: Path) -> int:
    """How many records the upload holds, pretraining documents or training records, whichever it holds:
    each checked, one line in memory at a time (a 200 MB upload of tiny lines is not a list of millions)."""
    if path.suffix in TABLE_SUFFIXES:  # its columns are mapped by the job's data.columns, checked at submit
        count = count_table_rows(path, str(path))
    else:
        records = iter_text_records(path, str(path)) if is_text_jsonl(path) else iter_records(str(path))
        count = sum(1 for _ in records)
    if count == 0:
        raise DataError(f"{path}: no records")
    return count


@router.get("", response_model=list[DatasetOut], name="list", responses=errors(401))
def list_datasets(session: SessionDep, user: CurrentUser) -> list[DatasetOut]:
    return [DatasetOut.model_validate(d) for d in crud.datasets_of(session, user.id)]


@router.delete("/{dataset_id}", response_model=Deleted, name="delete", responses=errors(401, 404, 409, 422))
def delete_dataset(dataset_id: ResourceId, session: SessionDep, user: CurrentUser, settings: SettingsDep) -> Deleted:
    """Delete an upload, which frees its bytes of your quota. A 409 while a queued or running job of
    yours reads it; finished jobs that read it keep their results."""
    dataset = crud.owned_dataset(session, dataset_id, user.id)
    if dataset is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dataset {dataset_id}")
    try:
        cleanup.delete_dataset(session, settings, dataset)
    except cleanup.InUse as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
    return Deleted(id=dataset_id)

"""/api/v1/datasets: upload a JSONL training or evaluation set, checked line by line."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from app import crud
from app.api.deps import NO_NUL, CurrentUser, SessionDep, SettingsDep
from app.api.errors import errors
from app.api.release import ReleasingRoute
from app.core.storage import s3_store
from app.job_paths import dataset_file
from app.models import Dataset, new_id
from app.schemas import DatasetOut
from worker.engine.corpus import is_text_jsonl, read_text_records
from worker.engine.data import DataError, read_records

log = logging.getLogger(__name__)
router = APIRouter(prefix="/datasets", tags=["datasets"], route_class=ReleasingRoute)  # see app/api/release.py


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    responses=errors(401, 413, 422, 429, 503),
    openapi_extra={"requestBody": {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}}},
)
async def upload(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    settings: SettingsDep,
    name: Annotated[str, Query(min_length=1, max_length=200, pattern=NO_NUL)],
) -> DatasetOut:
    """The request body is the JSONL file itself (`curl --data-binary @train.jsonl`). Records use
    Dolly's layout (instruction, input, output) or prompt/response; a bad line is named by number.
    A job refers to the upload as `dataset:ID` in data.train, data.selection or data.eval; an upload
    of {"text": ...} records is a pretraining corpus, for data.pretrain."""
    dataset_id = new_id("ds")
    path, digest, size = dataset_file(settings, dataset_id), hashlib.sha256(), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    room = settings.max_dataset_bytes_per_user - crud.dataset_bytes(session, user.id)
    try:
        with partial.open("wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise HTTPException(
                        status.HTTP_413_CONTENT_TOO_LARGE, f"datasets are limited to {settings.max_upload_bytes} bytes"
                    )
                if size > room:
                    raise HTTPException(
                        status.HTTP_429_TOO_MANY_REQUESTS,
                        f"your datasets may take {settings.max_dataset_bytes_per_user} bytes in all "
                        f"and {max(room, 0)} are left",
                    )
                digest.update(chunk)
                out.write(chunk)
        # Parsing a large file takes seconds: in a worker thread, so other requests are served meanwhile.
        records = await run_in_threadpool(_parse, partial)
    except (DataError, UnicodeDecodeError) as err:
        partial.unlink()
        message = str(err).replace(str(partial), name)
        raise RequestValidationError([{"loc": ("body",), "msg": message, "type": "value_error"}]) from None
    except BaseException:  # too large, the client gone mid-upload, anything else: no partial file stays
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
    dataset = crud.add_dataset(
        session,
        Dataset(
            id=dataset_id,
            user_id=user.id,
            name=name,
            path=str(path),
            num_records=len(records),
            size_bytes=size,
            sha256=digest.hexdigest(),
        ),
    )
    return DatasetOut.model_validate(dataset)


def _parse(path: Path) -> list:
    """The upload's records: pretraining documents or training records, whichever it holds."""
    return read_text_records(path, str(path)) if is_text_jsonl(path) else read_records(str(path))


@router.get("", response_model=list[DatasetOut], name="list", responses=errors(401))
def list_datasets(session: SessionDep, user: CurrentUser) -> list[DatasetOut]:
    return [DatasetOut.model_validate(d) for d in crud.datasets_of(session, user.id)]

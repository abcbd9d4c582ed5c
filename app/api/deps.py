"""Dependencies shared by the routes: the database session and the signed-in user."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app import crud
from app.core import rate_limits, slots
from app.core.config import Settings, get_settings
from app.core.db import get_session
from app.core.security import valid_signature
from app.models import Job, User

SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
_bearer = HTTPBearer(auto_error=False, description="A token from `distill users create NAME`.")
# Ids, cursors and names that reach PostgreSQL: its text refuses NUL (a DataError, a 500), so a
# NUL is a 422 naming the parameter. Job and dataset ids are 20 characters; 64 leaves room and bounds the echo.
NO_NUL = r"^[^\x00]*$"
ResourceId = Annotated[str, Path(max_length=64, pattern=NO_NUL)]


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _by_token(
    request: Request,
    session: Session,
    settings: Settings,
    credentials: HTTPAuthorizationCredentials | None,
    lookup: Callable,
):
    """What `lookup` finds for the request's live bearer token (its user, its id); a 401 without one.
    Tokens that sign nobody in are counted per client address: past failed_sign_in_limit, the address
    gets a 429 for a while, whatever token it sends (no guessing at speed)."""
    address = f"sign-in:{request.client.host if request.client else '?'}"
    failures = (settings.rate_limit_storage, settings.failed_sign_in_limit, "failed sign-ins from this address")
    if credentials:
        rate_limits.check(*failures, address)
    found = lookup(session, credentials.credentials) if credentials else None
    release_connection(session)
    if found is None:
        if credentials:
            rate_limits.hit(*failures, address)
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or unknown bearer token", {"WWW-Authenticate": "Bearer"}
        )
    return found


def current_user(request: Request, session: SessionDep, settings: SettingsDep, credentials: Credentials) -> User:
    return _by_token(request, session, settings, credentials, crud.user_for_token)


def release_connection(session: Session) -> None:
    """End a dependency's read transaction, so that its connection goes back to the pool at once.

    FastAPI runs each sync dependency and then the route in separate threadpool calls. A connection
    kept in between belongs to a request waiting for a thread, while the threads (40) may all be
    waiting for a connection (the pool has 15): with 200 concurrent submits nothing moved until the
    pool timed out, and requests failed (tests/chaos, "200 concurrent submits"). What was read stays
    loaded (expire_on_commit=False)."""
    session.commit()


CurrentUser = Annotated[User, Depends(current_user)]


def owned_job(job_id: ResourceId, session: SessionDep, user: CurrentUser) -> Job:
    """The job, if it is the user's; anyone else's job is answered exactly like a missing one."""
    job = session.get(Job, job_id)
    release_connection(session)
    if job is None or job.user_id != user.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job


OwnedJob = Annotated[Job, Depends(owned_job)]


async def stream_slot(user: CurrentUser, settings: SettingsDep) -> AsyncIterator[None]:
    """One of the user's event-stream slots, held until the stream ends or the client goes away:
    FastAPI leaves a dependency like this one only after the streamed response is over."""
    limit = settings.max_streams_per_user
    try:
        with slots.slot(("stream", user.id), limit):
            yield
    except slots.TooMany:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"you have {limit} event streams open, the most allowed "
            "(max_streams_per_user); close one before opening another",
        ) from None


StreamSlot = Annotated[None, Depends(stream_slot)]


def downloadable_job(
    job_id: ResourceId,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    credentials: Credentials,
    expires: Annotated[int | None, Query(description="from a signed link")] = None,
    kid: Annotated[str | None, Query(description="from a signed link: the id of the key that signed it")] = None,
    tid: Annotated[
        int | None, Query(ge=0, le=2**63 - 1, description="from a signed link: the id of the token that made it")
    ] = None,
    signature: Annotated[str | None, Query(description="from a signed link")] = None,
) -> Job:
    """A job whose files may be downloaded: the user's own (bearer token), or any job through a
    signed link made for exactly this path, until it expires or the token that made it is revoked."""
    if signature is None:
        return owned_job(job_id, session, current_user(request, session, settings, credentials))
    refused = HTTPException(status.HTTP_403_FORBIDDEN, "this download link is invalid or has expired")
    if None in (expires, kid, tid) or not valid_signature(request.url.path, expires, kid, tid, signature):
        raise refused
    job = session.get(Job, job_id)
    live = job is not None and crud.token_is_live(session, tid, job.user_id)
    release_connection(session)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    if not live:  # the token that made the link was revoked or has expired since
        raise refused
    return job


def current_token_id(request: Request, session: SessionDep, settings: SettingsDep, credentials: Credentials) -> int:
    """The id of the request's own token, which a signed link made by this request names."""
    return _by_token(request, session, settings, credentials, crud.live_token_id)


CurrentTokenId = Annotated[int, Depends(current_token_id)]


DownloadableJob = Annotated[Job, Depends(downloadable_job)]

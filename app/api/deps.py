"""Dependencies shared by the routes: the database session and the signed-in user."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app import crud
from app.core.config import Settings, get_settings
from app.core.db import get_session
from app.core.security import valid_signature
from app.models import Job, User

SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
_bearer = HTTPBearer(auto_error=False, description="A token from `distill users create NAME`.")


def current_user(session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> User:
    user = crud.user_for_token(session, credentials.credentials) if credentials else None
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or unknown bearer token", {"WWW-Authenticate": "Bearer"})
    return user


CurrentUser = Annotated[User, Depends(current_user)]


def owned_job(job_id: str, session: SessionDep, user: CurrentUser) -> Job:
    """The job, if it is the user's; anyone else's job is answered exactly like a missing one."""
    job = session.get(Job, job_id)
    if job is None or job.user_id != user.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job


OwnedJob = Annotated[Job, Depends(owned_job)]


def downloadable_job(
    job_id: str,
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    expires: Annotated[int | None, Query(description="from a signed link")] = None,
    signature: Annotated[str | None, Query(description="from a signed link")] = None,
) -> Job:
    """A job whose files may be downloaded: the user's own (bearer token), or any job through a
    signed link made for exactly this path, until it expires."""
    if signature is None:
        return owned_job(job_id, session, current_user(session, credentials))
    if expires is None or not valid_signature(request.url.path, expires, signature):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this download link is invalid or has expired")
    job = session.get(Job, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job


DownloadableJob = Annotated[Job, Depends(downloadable_job)]

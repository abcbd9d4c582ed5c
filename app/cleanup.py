"""Deleting what a user no longer needs: a finished job with everything it wrote, an upload that no
unfinished job reads, and (with DISTILL_RETENTION_DAYS) finished jobs past their time.

The row goes first, in its own transaction, then the files. A failure in between leaves files that
nothing points at, never a row whose files are gone.
"""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import crud, job_refs
from app.core.config import Settings
from app.core.db import db_now
from app.core.storage import s3_store
from app.job_paths import dataset_file, job_dir
from app.models import TERMINAL, Dataset, Job
from distill_client.models import DATA_FILES

log = logging.getLogger(__name__)


class InUse(Exception):
    """What was to be deleted is still needed: a job that has not ended, or an upload such a job reads."""


def delete_job(session: Session, settings: Settings, job_id: str) -> None:
    """Delete a finished job: its row (its events, evals and checkpoints go with it), its folder and
    its objects in the bucket. InUse while it is queued, running or cancelling, or while an unfinished
    job's model is one of its checkpoints (job:ID)."""
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if job is None:  # deleted meanwhile, by another request or the retention sweep
        session.rollback()
        return
    if job.status not in TERMINAL:
        session.rollback()
        raise InUse(f"job {job_id} is {job.status}: cancel it, or wait for it to end, before deleting it")
    if readers := job_refs.readers_of(session, job):
        session.rollback()
        raise InUse(f"job {job_id}'s checkpoints are a model of {', '.join(readers)}, which has not ended")
    session.delete(job)
    session.commit()
    shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)
    if (store := s3_store()) is not None:
        url = store.job_url(job_id)
        store.delete(url, store.names(url, ""))


def delete_dataset(session: Session, settings: Settings, dataset: Dataset) -> None:
    """Delete an upload and its copy in the bucket, which frees its bytes of the owner's quota. InUse
    while a queued, running or cancelling job of theirs reads it (their row is locked meanwhile, as a
    submit locks it: no such job is added while this looks)."""
    crud.lock_user(session, dataset.user_id)
    ref = f"dataset:{dataset.id}"
    readers = [
        job.id
        for job in crud.unfinished_jobs(session, dataset.user_id)
        if any(job.spec.get("data", {}).get(key) == ref for key in DATA_FILES)
    ]
    if readers:
        session.rollback()
        raise InUse(f"dataset {dataset.id} is read by {', '.join(readers)}, which has not ended")
    session.delete(dataset)
    session.commit()
    path = dataset_file(settings, dataset.id, dataset.name)
    path.unlink(missing_ok=True)
    if (store := s3_store()) is not None:
        store.delete(store.datasets_url(), [path.name])


def delete_expired_jobs(session: Session, settings: Settings) -> list[str]:
    """Delete the jobs that ended more than `retention_days` ago (none without the setting), but those a
    newer unfinished job builds on; the ids deleted."""
    if settings.retention_days is None:
        return []
    cutoff = db_now(session) - timedelta(days=settings.retention_days)
    expired = list(session.scalars(select(Job.id).where(Job.status.in_(TERMINAL), Job.finished_at < cutoff)))
    deleted = []
    for job_id in expired:
        try:
            delete_job(session, settings, job_id)
        except InUse as err:  # a newer job builds on its checkpoints: kept until that one ends
            log.info("kept job %s past retention_days: %s", job_id, err)
            continue
        deleted.append(job_id)
        log.info("deleted job %s: it ended more than %g days ago (retention_days)", job_id, settings.retention_days)
    return deleted

"""Building on an earlier job: `job:ID` names one of its checkpoints as a job's teacher or student.

`job:ID@best` (the default, `job:ID` alone), `job:ID@latest` or `job:ID@step-N`. Like an upload, it
is its owner's only: another user's job reads as no job at all. The spec keeps the reference (the
job's lineage, shown wherever the spec is); the machine that reads the model gets the checkpoint's
directory: the API where it shares the workers' files, a worker from its disk or from the bucket.
"""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy.orm import Session

from app import crud
from app.core.config import Settings
from app.core.storage import s3_store
from app.job_paths import job_dir
from app.models import Checkpoint, Job

_REF = re.compile(r"job:([A-Za-z0-9_-]{1,64})(?:@(best|latest|step-([0-9]{1,10})))?")


def checkpoint_of(session: Session, ref: str, user_id: int) -> Checkpoint | None:
    """The checkpoint `ref` names among user `user_id`'s jobs; None if there is no such job of theirs,
    no such checkpoint, or `ref` is not a job reference."""
    match = _REF.fullmatch(ref)
    if match is None:
        return None
    job = session.get(Job, match[1])
    if job is None or job.user_id != user_id:
        return None
    return crud.checkpoint_at(session, job, match[3] or match[2] or "best")


def local_dir(checkpoint: Checkpoint, settings: Settings) -> str:
    """The checkpoint's model directory on this machine: where its job wrote it, or, on a machine
    that does not share that folder, a copy of the bucket's, under the same layout."""
    if Path(checkpoint.path).is_dir():
        return checkpoint.path
    here = job_dir(settings, checkpoint.job_id) / "checkpoints" / Path(checkpoint.path).name
    store = s3_store()
    if store is not None and checkpoint.storage_url and not (here / "config.json").exists():
        for f in sorted(checkpoint.files, key=lambda f: f["name"] == "config.json"):  # config.json last: a whole copy
            store.download(checkpoint.storage_url, f"checkpoints/{here.name}/{f['name']}", here / f["name"])
    return str(here)


def readers_of(session: Session, job: Job) -> list[str]:
    """The ids of the owner's unfinished jobs whose teacher or student is one of `job`'s checkpoints."""
    return [
        other.id
        for other in crud.unfinished_jobs(session, job.user_id)
        if any(
            (match := _REF.fullmatch(ref or "")) and match[1] == job.id
            for ref in (other.spec.get("teacher"), (other.spec.get("student") or {}).get("model"))
        )
    ]

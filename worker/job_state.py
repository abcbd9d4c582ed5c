"""A job's resume state, kept checkpoints and uploaded datasets, brought from the bucket to this
machine before an attempt.

With S3 configured the worker copies every checkpoint and the state to resume from it to the bucket
(`worker/reporter.py`). A job taken up again on another machine (another artifacts folder) finds
neither on its disk; the supervisor copies them into the job's folder before the training processes
start, so the engine resumes from the newest step instead of step 0, and the best checkpoint it keeps
is there for the final evaluation. Likewise the datasets it reads that were uploaded through an API
on another machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from app.core.config import Settings
from app.core.storage import S3Store
from app.job_paths import dataset_file
from app.models import Dataset
from distill_client.api import sha256_file
from worker.engine.paths import RESUME_STATE_FILE


def restore(store: S3Store, job_id: str, out: Path) -> int | None:
    """Copy the bucket's newest complete resume state and its kept checkpoints into the job's folder
    `out`, where they are missing; the step of the resume state brought, or None (none in the bucket,
    or this machine has it)."""
    url = store.job_url(job_id)
    names = store.names(url, "")
    complete = sorted(n.split("/")[1] for n in names if n.startswith("resume/") and n.endswith("/" + RESUME_STATE_FILE))
    if not complete or (out / "resume" / complete[-1] / RESUME_STATE_FILE).exists():
        return None
    for name in names:
        if name.startswith("checkpoints/") and not (out / name).exists():
            store.download(url, name, out / name)
    step = complete[-1]
    partial = out / "resume" / f".{step}.partial"  # renamed into place once whole: the engine never sees half of it
    shutil.rmtree(partial, ignore_errors=True)
    for name in names:
        if name.startswith(f"resume/{step}/"):
            store.download(url, name, partial / name.removeprefix(f"resume/{step}/"))
    shutil.rmtree(out / "resume" / step, ignore_errors=True)
    partial.rename(out / "resume" / step)
    return int(step.removeprefix("step-"))


def bring_datasets(store: S3Store, datasets: list[Dataset], settings: Settings) -> None:
    """Copy each of `datasets` that is on neither its recorded path nor this machine's place for it
    (`dataset_file`) from the bucket to that place, checked against the upload's hash."""
    for dataset in datasets:
        target = dataset_file(settings, dataset.id, dataset.name)
        if target.exists() or Path(dataset.path).exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")  # jobs on this machine may race
        os.close(fd)
        try:
            store.download(store.datasets_url(), target.name, Path(partial))
            if sha256_file(Path(partial)) != dataset.sha256:
                raise ValueError(f"dataset:{dataset.id}: the bucket's copy does not match the upload's sha256")
            os.replace(partial, target)
        finally:
            Path(partial).unlink(missing_ok=True)

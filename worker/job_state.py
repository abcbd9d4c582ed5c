"""A job's resume state and kept checkpoints, brought from the bucket to this machine before an attempt.

With S3 configured the worker copies every checkpoint and the state to resume from it to the bucket
(`worker/reporter.py`). A job taken up again on another machine (another artifacts folder) finds
neither on its disk; the supervisor copies them into the job's folder before the training processes
start, so the engine resumes from the newest step instead of step 0, and the best checkpoint it keeps
is there for the final evaluation.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from app.core.storage import S3Store
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

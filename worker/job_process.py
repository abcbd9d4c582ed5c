"""The training process of one job attempt: `python -m worker.job_process JOB_ID --attempt N`.

Started by the supervisor (alone, or once per rank under the DeepSpeed launcher). It reads the spec
from the database, resolves uploaded datasets to their files, and runs the engine with a reporter
that writes everything to the database.
"""

from __future__ import annotations

import argparse
import sys

from app.core.config import get_settings
from app.core.db import session_factory
from app.models import Dataset, Job
from worker.engine.spec import DATA_FILES, JobSpec
from worker.engine.trainer import Cancelled, train
from worker.reporter import DbReporter
from worker.supervisor import die_with_parent, job_dir


def resolve_datasets(spec: dict, session) -> dict:
    """Replace `dataset:ID` references with the uploaded file's path."""
    data = dict(spec.get("data", {}))
    for key in DATA_FILES:
        ref = data.get(key)
        if isinstance(ref, str) and ref.startswith("dataset:"):
            data[key] = session.get(Dataset, ref.removeprefix("dataset:")).path
    return {**spec, "data": data}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job_id")
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the DeepSpeed launcher")
    args = parser.parse_args()
    die_with_parent()  # the launcher (or the supervisor) is gone: so is this attempt
    settings = get_settings()
    with session_factory()() as session:
        spec = JobSpec.model_validate(resolve_datasets(session.get(Job, args.job_id).spec, session))
    reporter = DbReporter(args.job_id, args.attempt)
    try:
        train(spec, job_dir(settings, args.job_id), reporter)
    except Cancelled:
        pass
    except Exception:  # already reported as the job's failure by the trainer
        sys.exit(1)
    finally:
        # Events that waited out a database outage, the outcome among them: written before exiting,
        # for as long as the job's lease lasts (after that the job is taken up again anyway).
        reporter.flush(seconds=settings.heartbeat_timeout_seconds)


if __name__ == "__main__":
    main()

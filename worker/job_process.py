"""The training process of one job attempt: `python -m worker.job_process JOB_ID --attempt N`.

Started by the supervisor (alone, or once per rank under the DeepSpeed launcher). It reads the spec
from the database, checks it again where the files are read (app/acceptance.py), and runs the engine
with a reporter that writes everything to the database and a readable line per step to its output,
which is the attempt's log.
"""

from __future__ import annotations

import argparse
import sys

from app import acceptance, crud, job_refs
from app.core.config import Settings, get_settings
from app.core.db import session_factory
from app.core.path_roots import Roots
from app.job_paths import dataset_file, job_dir
from app.models import Job
from distill_client.status import JobStatus
from worker.engine.events import Event, Fanout, LogLineReporter
from worker.engine.spec import JobSpec
from worker.engine.trackers import trackers_for
from worker.engine.trainer import Cancelled, train
from worker.reporter import DbReporter
from worker.supervisor import die_with_parent


def readable_spec(job: Job, session, settings: Settings) -> JobSpec:
    """The job's spec as the engine runs it here: checked on this machine, where the files are read
    (paths resolved against the roots, models and data looked at), each upload its file on this
    machine (the copy brought from the bucket, where the API's folder is elsewhere), each job:ID model
    its checkpoint's directory here (likewise). Refused names what the job may not read (any more): a
    path outside the roots, an upload or a job deleted since."""

    def upload(dataset_id: str) -> str | None:
        dataset = crud.owned_dataset(session, dataset_id, job.user_id)
        if dataset is None:
            return None
        copy = dataset_file(settings, dataset.id, dataset.name)
        return str(copy) if copy.exists() else dataset.path

    def checkpoint(ref: str) -> str | None:
        found = job_refs.checkpoint_of(session, ref, job.user_id)
        return None if found is None else job_refs.local_dir(found, settings)

    reader = acceptance.Reader(Roots.of(settings), reads_files=True, upload=upload, checkpoint=checkpoint)
    return acceptance.runnable(JobSpec.model_validate(job.spec), reader)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job_id")
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the DeepSpeed launcher")
    args = parser.parse_args()
    die_with_parent()  # the launcher (or the supervisor) is gone: so is this attempt
    settings = get_settings()
    reporter = DbReporter(args.job_id, args.attempt)
    try:
        with session_factory()() as session:
            spec = readable_spec(session.get(Job, args.job_id), session, settings)
    except acceptance.Refused as err:
        reporter.emit(
            Event(
                "state",
                f"failed: {err}",
                "error",
                {"state": JobStatus.FAILED, "error": {"code": "SpecRefused", "message": str(err)}},
            )
        )
        reporter.flush(seconds=settings.heartbeat_timeout_seconds)
        sys.exit(1)
    try:
        # Everything to the database, a readable line per step and event to the attempt's log, and the
        # job's experiment trackers.
        out = job_dir(settings, args.job_id)
        train(spec, out, Fanout(reporter, LogLineReporter(sys.stdout), *trackers_for(spec, out)))
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

"""Deleting what users no longer need: finished jobs and uploads (DELETE), finished jobs past
DISTILL_RETENTION_DAYS, and Idempotency-Keys that let go of their job after DISTILL_IDEMPOTENCY_KEY_HOURS
(real PostgreSQL; no worker runs, so jobs stay queued until cancelled)."""

from datetime import timedelta

import pytest
from api_helpers import DATASETS, JOBS, add_checkpoint, dataset_files, dataset_lines, db, events_of, new_job, submit
from helpers import make_user, tiny_spec
from sqlalchemy import func, select, update

from app import cleanup
from app.core.config import get_settings
from app.models import Checkpoint, EvalResult, Job, JobEvent, utcnow

pytestmark = pytest.mark.usefixtures("served_test_queues")


def cancel(client, auth, job_id: str) -> None:
    assert client.post(f"{JOBS}/{job_id}/cancel", headers=auth).json()["status"] == "cancelled"


def rows_of(job_id: str) -> int:
    with db() as session:
        return sum(
            session.scalar(select(func.count()).select_from(table).where(table.job_id == job_id))
            for table in (JobEvent, EvalResult, Checkpoint)
        )


def with_outputs(job_id: str):
    """What a worker leaves of a job: a checkpoint folder and a log on disk, checkpoint and eval rows."""
    folder = add_checkpoint(job_id, 1).parent.parent
    (folder / "attempt-1.log").write_text("step 1/1 minillm: loss 1\n")
    with db() as session:
        session.add(EvalResult(job_id=job_id, step=1, label="final", scores={"rouge_l": 1.0}))
        session.commit()
    return folder


def test_a_finished_job_is_deleted_with_its_rows_and_files_and_an_unfinished_one_is_refused(client, auth, dataset):
    job_id = new_job(client, auth, dataset)["id"]
    folder = with_outputs(job_id)
    refused = client.delete(f"{JOBS}/{job_id}", headers=auth)
    assert refused.status_code == 409 and "is queued: cancel it" in refused.json()["message"]
    assert folder.exists() and client.get(f"{JOBS}/{job_id}", headers=auth).status_code == 200

    cancel(client, auth, job_id)
    assert client.delete(f"{JOBS}/{job_id}", headers=make_user()).status_code == 404  # not theirs
    assert rows_of(job_id) > 0
    deleted = client.delete(f"{JOBS}/{job_id}", headers=auth)
    assert deleted.status_code == 200 and deleted.json() == {"id": job_id, "deleted": True}
    assert client.get(f"{JOBS}/{job_id}", headers=auth).status_code == 404
    assert not folder.exists() and rows_of(job_id) == 0
    assert client.delete(f"{JOBS}/{job_id}", headers=auth).status_code == 404


def test_an_upload_is_deleted_unless_an_unfinished_job_reads_it_and_its_bytes_leave_the_quota(
    client, auth, dataset, monkeypatch
):
    body = dataset_lines(dataset, 16)
    monkeypatch.setattr(get_settings(), "max_dataset_bytes_per_user", len(body) + 5)
    upload = client.post(DATASETS, params={"name": "train.jsonl"}, content=body, headers=auth).json()
    assert client.post(DATASETS, params={"name": "more.jsonl"}, content=body, headers=auth).status_code == 429
    reader = new_job(client, auth, dataset, data={"train": f"dataset:{upload['id']}"})["id"]

    refused = client.delete(f"{DATASETS}/{upload['id']}", headers=auth)
    assert refused.status_code == 409 and reader in refused.json()["message"]
    assert client.delete(f"{DATASETS}/{upload['id']}", headers=make_user()).status_code == 404  # not theirs
    cancel(client, auth, reader)
    assert client.delete(f"{DATASETS}/{upload['id']}", headers=auth).status_code == 200
    assert client.get(DATASETS, headers=auth).json() == [] and f"{upload['id']}.jsonl" not in dataset_files()
    assert client.post(DATASETS, params={"name": "more.jsonl"}, content=body, headers=auth).status_code == 201
    # The finished job that read it keeps what it has.
    assert client.get(f"{JOBS}/{reader}", headers=auth).json()["spec"]["data"]["train"] == f"dataset:{upload['id']}"


def test_jobs_that_ended_before_the_retention_period_are_deleted_but_newer_ones_and_those_built_on(
    client, auth, dataset
):
    old, base, recent, running = (new_job(client, auth, dataset)["id"] for _ in range(4))
    for job_id in (old, base, recent):
        cancel(client, auth, job_id)
    folder, _ = with_outputs(old), with_outputs(base)
    builder = new_job(client, auth, dataset, student={"model": f"job:{base}@latest"})["id"]  # queued: unfinished
    with db() as session:  # `old` and `base` ended three days ago; `running` and `builder` never ended
        ended = utcnow() - timedelta(days=3)
        session.execute(update(Job).where(Job.id.in_([old, base])).values(finished_at=ended))
        session.commit()
        assert cleanup.delete_expired_jobs(session, get_settings()) == []  # no retention_days: nothing goes
        # A copy of the settings: the API's own reaper, which runs this too, keeps to the ones it has.
        two_days = get_settings().model_copy(update={"retention_days": 2})
        assert cleanup.delete_expired_jobs(session, two_days) == [old]
    assert client.get(f"{JOBS}/{old}", headers=auth).status_code == 404 and not folder.exists()
    kept = (base, recent, running, builder)
    assert [client.get(f"{JOBS}/{j}", headers=auth).status_code for j in kept] == [200] * 4
    cancel(client, auth, builder)
    cancel(client, auth, running)


def test_an_idempotency_key_names_its_job_for_a_day_then_makes_a_new_one(client, auth, dataset):
    spec, key = tiny_spec(dataset), {"Idempotency-Key": "ci-run-42"}
    first = submit(client, auth, spec, **key).json()
    assert submit(client, auth, spec, **key).json()["id"] == first["id"]
    with db() as session:  # a day and a minute later
        later = utcnow() - timedelta(hours=get_settings().idempotency_key_hours, minutes=1)
        session.execute(update(Job).where(Job.id == first["id"]).values(created_at=later))
        session.commit()
    again = submit(client, auth, {**spec, "name": "re-run"}, **key)  # a new body is no conflict now
    assert again.status_code == 201 and again.json()["id"] != first["id"]
    assert submit(client, auth, {**spec, "name": "re-run"}, **key).json()["id"] == again.json()["id"]
    assert [e["data"]["state"] for e in events_of(client, auth, first["id"])] == ["queued"]  # the old job is as it was

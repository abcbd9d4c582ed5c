"""Building on earlier jobs through the API (real PostgreSQL; no worker runs, so jobs stay queued
until cancelled): a checkpoint as the model of a new job (`job:ID@best`), owner-checked, and a failed
or cancelled job resumed. tests/service/test_worker.py runs both to success on a real worker."""

import pytest
from api_helpers import JOBS, add_checkpoint, db, events_of, locs, new_job, submit
from helpers import make_user, tiny_spec
from sqlalchemy import func, select

from app.core.config import get_settings
from app.models import WebhookDelivery

pytestmark = pytest.mark.usefixtures("served_test_queues")


def cancelled_with_a_checkpoint(client, auth, dataset) -> str:
    """A cancelled job with a checkpoint at step 4, as a worker leaves one (a model directory on disk and its row)."""
    job_id = new_job(client, auth, dataset)["id"]
    assert client.post(f"{JOBS}/{job_id}/cancel", headers=auth).json()["status"] == "cancelled"
    add_checkpoint(job_id, 4)
    return job_id


def test_a_checkpoint_of_an_earlier_job_is_a_model_of_a_new_one_for_its_owner_only(client, auth, dataset):
    source = cancelled_with_a_checkpoint(client, auth, dataset)
    for ref in (f"job:{source}", f"job:{source}@best", f"job:{source}@latest", f"job:{source}@step-4"):
        response = submit(client, auth, tiny_spec(dataset, student={"model": ref}))
        assert response.status_code == 201, response.text
        assert response.json()["spec"]["student"]["model"] == ref  # the spec keeps the lineage
    chained = response.json()["id"]

    missing = submit(client, auth, tiny_spec(dataset, teacher=f"job:{source}@step-5"))
    assert missing.status_code == 422 and locs(missing) == [["body", "teacher"]]
    assert "no such job of yours with that checkpoint" in missing.json()["detail"][0]["msg"]
    theirs = submit(client, make_user(), tiny_spec(dataset, student={"model": f"job:{source}"}))
    assert theirs.status_code == 422 and locs(theirs) == [["body", "student", "model"]]

    # While a job that has not ended builds on it, the source job stays.
    refused = client.delete(f"{JOBS}/{source}", headers=auth)
    assert refused.status_code == 409 and chained in refused.json()["message"]
    for job in client.get(JOBS, headers=auth).json()["data"]:
        if job["status"] == "queued":
            client.post(f"{JOBS}/{job['id']}/cancel", headers=auth)
    assert client.delete(f"{JOBS}/{source}", headers=auth).status_code == 200


def test_a_failed_or_cancelled_job_is_queued_again_with_more_attempts_and_others_are_refused(client, auth, dataset):
    job = new_job(client, auth, dataset)
    refused = client.post(f"{JOBS}/{job['id']}/resume", headers=auth)
    assert refused.status_code == 409 and "is queued: only a failed or cancelled job resumes" in refused.text
    client.post(f"{JOBS}/{job['id']}/cancel", headers=auth)
    with db() as session:  # the webhook of the end it leaves: not sent now that it runs on
        session.add(WebhookDelivery(job_id=job["id"], url="https://example.com/hook", payload={}))
        session.commit()

    assert client.post(f"{JOBS}/{job['id']}/resume", headers=make_user()).status_code == 404  # not theirs
    resumed = client.post(f"{JOBS}/{job['id']}/resume", headers=auth)
    assert resumed.status_code == 200, resumed.text
    again = resumed.json()
    assert again["status"] == "queued" and again["finished_at"] is None and again["error"] is None
    assert again["max_attempts"] == again["attempts"] + get_settings().max_attempts  # the ones it had, and as many anew
    assert [e["data"]["state"] for e in events_of(client, auth, job["id"]) if e["type"] == "state"] == [
        "queued",
        "cancelled",
        "queued",
    ]
    with db() as session:
        assert session.scalar(select(func.count()).where(WebhookDelivery.job_id == job["id"])) == 0
    assert client.post(f"{JOBS}/{job['id']}/resume", headers=auth).status_code == 409  # queued already
    client.post(f"{JOBS}/{job['id']}/cancel", headers=auth)


def test_at_the_active_job_limit_a_job_that_cannot_resume_is_409_and_one_that_can_is_429(
    client, auth, dataset, monkeypatch
):
    queued, cancelled = new_job(client, auth, dataset), new_job(client, auth, dataset)
    client.post(f"{JOBS}/{cancelled['id']}/cancel", headers=auth)
    monkeypatch.setattr(get_settings(), "max_active_jobs_per_user", 1)  # the queued one fills it
    assert client.post(f"{JOBS}/{queued['id']}/resume", headers=auth).status_code == 409  # what it is, not the limit
    refused = client.post(f"{JOBS}/{cancelled['id']}/resume", headers=auth)
    assert refused.status_code == 429, refused.text
    assert client.get(f"{JOBS}/{cancelled['id']}", headers=auth).json()["status"] == "cancelled"  # left as it was
    client.post(f"{JOBS}/{queued['id']}/cancel", headers=auth)

"""The status machine: a job claimed once, and lost jobs reaped."""

from datetime import timedelta

import pytest
from api_helpers import (
    JOBS,
    db,
    events_of,
    new_job,
    set_heartbeat_back,
)

pytestmark = pytest.mark.usefixtures("served_test_queues")


# -- 7. status machine: claim and reaping -------------------------------------------------------


def test_claim_once(client, auth, dataset):
    from app import job_status

    job = new_job(client, auth, dataset)
    with db() as session:
        assert job_status.claim(session, job["id"], "w1") == 1
        assert job_status.claim(session, job["id"], "w2") is None  # a redelivered duplicate is ignored
        assert job_status.finish(session, job["id"], 1, "succeeded")
    fetched = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert fetched["attempts"] == 1
    assert [e["data"]["state"] for e in events_of(client, auth, job["id"])] == ["queued", "running", "succeeded"]


def test_reaper_requeues_a_lost_job_while_attempts_remain(client, auth, dataset):
    from app import job_status

    job = new_job(client, auth, dataset)
    with db() as session:
        attempt = job_status.claim(session, job["id"], "w1")
    set_heartbeat_back(job["id"])
    with db() as session:
        assert job["id"] not in job_status.reap_stale(session, timedelta(minutes=1))  # not stale yet
        assert job["id"] in job_status.reap_stale(session, timedelta(seconds=0))
        # the lost attempt can no longer report
        assert job_status.heartbeat(session, job["id"], attempt) is False
        assert job_status.finish(session, job["id"], attempt, "succeeded") is False
    requeued = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert requeued["status"] == "queued" and requeued["attempts"] == 1
    last = events_of(client, auth, job["id"])[-1]
    assert last["data"]["state"] == "queued" and last["level"] == "warning"
    with db() as session:  # the next attempt takes it
        assert job_status.claim(session, job["id"], "w2") == 2
        assert job_status.finish(session, job["id"], 2, "succeeded")


def test_a_worker_whose_clock_is_two_minutes_slow_keeps_its_job(client, auth, dataset, monkeypatch):
    """Heartbeats and the reaper read the database's clock, not each machine's own."""
    from datetime import datetime, timezone

    import app.crud
    import app.job_status
    import app.models
    from app import job_status
    from app.core.db import db_now

    job = new_job(client, auth, dataset)
    slow = lambda: datetime.now(timezone.utc) - timedelta(minutes=2)  # noqa: E731
    for module in (app.models, app.crud, app.job_status):  # wherever a machine clock could be read
        monkeypatch.setattr(module, "utcnow", slow, raising=False)
    with db() as session:  # the slow worker claims the job and beats
        attempt = job_status.claim(session, job["id"], "slow-worker")
        assert job_status.heartbeat(session, job["id"], attempt)
        beat = session.get(app.models.Job, job["id"], populate_existing=True).heartbeat_at
        assert abs((db_now(session) - beat).total_seconds()) < 30  # the database's time, not the slow clock's
    monkeypatch.undo()
    with db() as session:  # a reaper with a correct clock and a one-minute lease
        assert job["id"] not in job_status.reap_stale(session, timedelta(minutes=1))
    assert client.get(f"{JOBS}/{job['id']}", headers=auth).json()["status"] == "running"
    with db() as session:
        job_status.finish(session, job["id"], attempt, "succeeded")


def test_reaper_fails_a_job_out_of_attempts(client, auth, dataset):
    from app import job_status

    job = new_job(client, auth, dataset)
    with db() as session:
        job_status.claim(session, job["id"], "w1")
    set_heartbeat_back(job["id"], attempts=3)
    with db() as session:
        assert job["id"] not in job_status.reap_stale(session, timedelta(seconds=0))
    failed = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert failed["status"] == "failed" and failed["finished_at"] is not None
    assert failed["error"]["code"] == "WorkerLost"
    last = events_of(client, auth, job["id"])[-1]
    assert last["data"]["state"] == "failed" and last["data"]["error"]["code"] == "WorkerLost"


def test_reaper_ends_a_cancelling_job_whose_worker_died(client, auth, dataset):
    from app import job_status

    job = new_job(client, auth, dataset)
    with db() as session:
        job_status.claim(session, job["id"], "w1")
    assert client.post(f"{JOBS}/{job['id']}/cancel", headers=auth).json()["status"] == "cancelling"
    set_heartbeat_back(job["id"])
    with db() as session:
        assert job["id"] not in job_status.reap_stale(session, timedelta(seconds=0))
    done = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert done["status"] == "cancelled" and done["finished_at"] is not None
    assert events_of(client, auth, job["id"])[-1]["data"]["state"] == "cancelled"


def test_reaper_leaves_fresh_and_queued_jobs_alone(client, auth, dataset):
    from app import job_status

    queued = new_job(client, auth, dataset)
    running = new_job(client, auth, dataset)
    with db() as session:
        job_status.claim(session, running["id"], "w1")
        reaped = job_status.reap_stale(session, timedelta(seconds=60))
        assert queued["id"] not in reaped and running["id"] not in reaped
        assert job_status.finish(session, running["id"], 1, "succeeded")
    assert client.get(f"{JOBS}/{queued['id']}", headers=auth).json()["status"] == "queued"
    assert client.get(f"{JOBS}/{running['id']}", headers=auth).json()["status"] == "succeeded"

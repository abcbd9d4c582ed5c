"""A job submitted while the broker refuses writes is kept, and sent once the broker is back.

The fault is real: Redis is told to refuse every write (maxmemory 1 byte, no eviction), the way a
full or failing broker refuses them, and given its memory back afterwards.
"""

import time
from contextlib import contextmanager
from datetime import timedelta

import redis
from conftest import REDIS_DB
from helpers import tiny_spec
from sqlalchemy import update

JOBS = "/api/v1/jobs"


@contextmanager
def broker_refusing_writes():
    server = redis.Redis(db=REDIS_DB)
    saved = {k: v for k, v in server.config_get("maxmemory*").items() if k in ("maxmemory", "maxmemory-policy")}
    server.config_set("maxmemory-policy", "noeviction")
    server.config_set("maxmemory", 1)
    try:
        yield
    finally:
        for key, value in saved.items():
            server.config_set(key, value)


def queued_messages(queue: str) -> list[bytes]:
    return redis.Redis(db=REDIS_DB).lrange(queue, 0, -1)


def job_row(job_id: str):
    from app.core.db import session_factory
    from app.models import Job

    with session_factory()() as session:
        return session.get(Job, job_id)


def test_a_job_submitted_while_the_broker_is_down_is_sent_when_it_is_back(client, auth, dataset):
    spec = tiny_spec(dataset, name="outbox")
    headers = {**auth, "Idempotency-Key": "outbox-1"}
    with broker_refusing_writes():
        response = client.post(JOBS, json=spec, headers=headers)
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["status"] == "queued"
        assert job_row(job["id"]).published_at is None
        # A retry while the broker still refuses returns the same job, still waiting to be sent.
        again = client.post(JOBS, json=spec, headers=headers)
        assert again.status_code == 201 and again.json()["id"] == job["id"]
    messages = [m for m in queued_messages(job["queue"]) if job["id"].encode() in m]
    assert messages == []  # nothing reached the broker
    events = client.get(f"{JOBS}/{job['id']}/events", headers=auth).json()["data"]
    assert any("broker did not answer" in e["message"] for e in events)

    # The broker is back. The reaper (running in the API server) sends jobs that were never sent once
    # their creating request had its time to do it; make this one old enough instead of waiting.
    from app.core.db import session_factory
    from app.models import Job

    with session_factory()() as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(created_at=Job.created_at - timedelta(minutes=5)))
        session.commit()
    deadline = time.monotonic() + 15
    while job_row(job["id"]).published_at is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job_row(job["id"]).published_at is not None
    assert len([m for m in queued_messages(job["queue"]) if job["id"].encode() in m]) == 1  # sent once


def test_a_retry_with_the_same_key_sends_a_job_that_was_never_sent(client, auth, dataset):
    spec = tiny_spec(dataset, name="outbox-retry")
    headers = {**auth, "Idempotency-Key": "outbox-2"}
    with broker_refusing_writes():
        job = client.post(JOBS, json=spec, headers=headers).json()
    assert job_row(job["id"]).published_at is None
    again = client.post(JOBS, json=spec, headers=headers)  # the broker is back
    assert again.status_code == 201 and again.json()["id"] == job["id"]
    assert job_row(job["id"]).published_at is not None
    assert len([m for m in queued_messages(job["queue"]) if job["id"].encode() in m]) == 1

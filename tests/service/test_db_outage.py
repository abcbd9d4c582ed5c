"""PostgreSQL goes away mid-job, for real: the job's database refuses connections and its open
ones are closed, as in a restart. A short outage loses nothing; a long one hands the job over."""

import time
from contextlib import contextmanager

import psycopg
from conftest import DB_NAME
from helpers import job, submit, tiny_spec, training_process, wait_for, wait_status

ADMIN = "host=127.0.0.1 user=postgres dbname=postgres"


@contextmanager
def database_down():
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{DB_NAME}" ALLOW_CONNECTIONS false')
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (DB_NAME,),
        )
    try:
        yield
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{DB_NAME}" ALLOW_CONNECTIONS true')


def metric_steps(client, auth, job_id) -> list[int]:
    return [p["step"] for p in client.get(f"/api/v1/jobs/{job_id}/metrics", headers=auth).json()["loss"]]


def test_a_database_restart_mid_job_loses_no_metric_and_fails_nothing(client, auth, dataset, worker):
    spec = tiny_spec(
        dataset, training={"steps": 60}, checkpoints={"every_steps": 20, "keep": 1}, eval={"every_steps": 0}
    )
    job_id = submit(client, auth, spec)
    wait_for(lambda: job(client, auth, job_id)["progress"]["step"] >= 3, what="a few steps")
    with database_down():
        time.sleep(5)  # shorter than the lease (8 s in these tests): nobody takes the job over
    done = wait_status(client, auth, job_id, {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 1
    assert metric_steps(client, auth, job_id) == list(range(1, 61))  # none lost, none written twice


def test_a_database_outage_past_the_lease_stops_the_process_and_the_job_resumes(client, auth, dataset, worker):
    spec = tiny_spec(
        dataset, training={"steps": 200}, checkpoints={"every_steps": 10, "keep": 1}, eval={"every_steps": 0}
    )
    job_id = submit(client, auth, spec)
    wait_for(lambda: job(client, auth, job_id)["progress"]["step"] >= 12, what="a first checkpoint")
    with database_down():
        # The supervisor cannot renew the lease: it stops the training process before the lease ends,
        # so that the attempt the reaper starts later never runs beside it.
        wait_for(lambda: not training_process(job_id), timeout=30, what="the training process to stop")
    done = wait_status(client, auth, job_id, {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert metric_steps(client, auth, job_id)[-1] == 200

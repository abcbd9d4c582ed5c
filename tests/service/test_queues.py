"""Queues no worker serves: the registry of live workers, a queued job's place in its queue, and what
it waits for. Real rows in the `workers` table (written as a worker's reaper thread writes them) and
real `distill worker` processes; the jobs go to GPU queues that nothing here consumes, so they stay
queued until each test cancels them."""

from datetime import timedelta

import pytest
from helpers import Worker, job, make_user, submit, tiny_spec, wait_for
from sqlalchemy import update

JOBS = "/api/v1/jobs"


def gpu_job(client, auth, dataset, devices: int) -> str:
    """A job for queue gpu-DEVICES (method kd: no MiniLLM batch arithmetic to satisfy)."""
    return submit(client, auth, tiny_spec(dataset, method="kd", resources={"accelerator": "gpu", "devices": devices}))


def served() -> set[str]:
    from app import worker_registry
    from app.core.config import get_settings
    from app.core.db import session_factory

    with session_factory()() as session:
        return worker_registry.served_queues(session, timedelta(seconds=get_settings().heartbeat_timeout_seconds))


def register(name: str, queues: list[str]) -> None:
    from app import worker_registry
    from app.core.db import session_factory

    with session_factory()() as session:
        worker_registry.register(session, name, queues)


def unregister(name: str) -> None:
    from app import worker_registry
    from app.core.db import session_factory

    with session_factory()() as session:
        worker_registry.unregister(session, name)


def age(name: str, seconds: float) -> None:
    """Make a registration look `seconds` older: a worker that stopped refreshing it."""
    from app.core.db import db_now, session_factory
    from app.models import RegisteredWorker

    with session_factory()() as session:
        session.execute(
            update(RegisteredWorker)
            .where(RegisteredWorker.name == name)
            .values(seen_at=db_now(session) - timedelta(seconds=seconds))
        )
        session.commit()


def cancel(client, auth, *job_ids: str) -> None:
    for job_id in job_ids:
        assert client.post(f"{JOBS}/{job_id}/cancel", headers=auth).status_code == 200


def test_a_job_on_an_unserved_queue_says_what_it_waits_for_until_a_worker_serves_it(client, auth, dataset):
    job_id = gpu_job(client, auth, dataset, 8)
    queued = job(client, auth, job_id)
    assert queued["status"] == "queued" and queued["queue"] == "gpu-8" and queued["queue_position"] == 0
    assert queued["waiting_for"] == "no worker serves queue gpu-8; start one with `distill worker --queues gpu-8`"
    warnings = [
        e for e in client.get(f"{JOBS}/{job_id}/events", headers=auth).json()["data"] if e["level"] == "warning"
    ]
    assert [e["message"] for e in warnings] == [queued["waiting_for"]]

    register("gpu-box:1", ["gpu-4"])  # a live worker, but for another queue
    assert job(client, auth, job_id)["waiting_for"] == queued["waiting_for"]
    register("gpu-box:2", ["gpu-4", "gpu-8"])
    assert job(client, auth, job_id)["waiting_for"] is None
    assert [j["waiting_for"] for j in client.get(JOBS, headers=auth).json()["data"] if j["id"] == job_id] == [None]

    # A worker that stopped refreshing its registration (killed, its machine gone) serves nothing.
    age("gpu-box:2", 60)
    assert job(client, auth, job_id)["waiting_for"] == queued["waiting_for"]
    register("gpu-box:2", ["gpu-4", "gpu-8"])  # its next refresh
    assert job(client, auth, job_id)["waiting_for"] is None

    cancel(client, auth, job_id)
    ended = job(client, auth, job_id)
    assert ended["queue_position"] is None and ended["waiting_for"] is None  # only a queued job has either
    for name in ("gpu-box:1", "gpu-box:2"):
        unregister(name)


def test_a_submit_to_a_served_queue_has_no_warning(client, auth, dataset):
    register("gpu-box:3", ["gpu-3"])
    job_id = gpu_job(client, auth, dataset, 3)
    assert job(client, auth, job_id)["waiting_for"] is None
    assert [e["level"] for e in client.get(f"{JOBS}/{job_id}/events", headers=auth).json()["data"]] == ["info"]
    cancel(client, auth, job_id)
    unregister("gpu-box:3")


def test_queue_position_counts_the_queued_jobs_submitted_earlier_on_the_same_queue(client, auth, dataset):
    other = make_user()  # the queue is everyone's: another user's earlier job is ahead too
    first = gpu_job(client, auth, dataset, 7)
    second = gpu_job(client, other, dataset, 7)
    third = gpu_job(client, auth, dataset, 7)
    elsewhere = gpu_job(client, auth, dataset, 6)
    assert [job(client, a, j)["queue_position"] for a, j in ((auth, first), (other, second), (auth, third))] == [
        0,
        1,
        2,
    ]
    assert job(client, auth, elsewhere)["queue_position"] == 0
    listed = {j["id"]: j["queue_position"] for j in client.get(JOBS, headers=auth).json()["data"]}
    assert listed[first] == 0 and listed[third] == 2

    from app import job_status
    from app.core.db import session_factory

    with session_factory()() as session:  # the first is taken by a worker: no longer ahead of anyone
        assert job_status.claim(session, first, "gpu-box:7") == 1
    assert job(client, auth, first)["queue_position"] is None
    assert [job(client, other, second)["queue_position"], job(client, auth, third)["queue_position"]] == [0, 1]
    cancel(client, other, second)
    assert job(client, auth, third)["queue_position"] == 0
    with session_factory()() as session:
        assert job_status.finish(session, first, 1, "succeeded")
    cancel(client, auth, third, elsewhere)


@pytest.fixture
def refusing(client):
    """The API with DISTILL_REFUSE_UNSERVED_QUEUES set."""
    from app.core.config import Settings, get_settings

    client.app.dependency_overrides[get_settings] = lambda: Settings(refuse_unserved_queues=True)
    yield
    del client.app.dependency_overrides[get_settings]


def test_a_server_may_refuse_jobs_for_unserved_queues(client, auth, dataset, refusing):
    register("gpu-box:5", ["gpu-2"])
    before = len(client.get(JOBS, headers=auth, params={"limit": 100}).json()["data"])
    response = client.post(
        JOBS, headers=auth, json=tiny_spec(dataset, method="kd", resources={"accelerator": "gpu", "devices": 5})
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "resources"]
    assert "no worker serves queue gpu-5" in error["msg"] and "gpu-2" in error["msg"]
    assert len(client.get(JOBS, headers=auth, params={"limit": 100}).json()["data"]) == before  # nothing stored

    job_id = gpu_job(client, auth, dataset, 2)  # a served queue is accepted as always
    cancel(client, auth, job_id)
    unregister("gpu-box:5")


@pytest.mark.timeout(180)
def test_a_real_worker_registers_its_queues_and_a_killed_one_ages_out(client, auth, dataset, tmp_path):
    # Stopped the moment it registers: before Celery has even installed its own SIGTERM handler.
    stopped = Worker(tmp_path / "stopped.log", queues="gpu-5").start()
    wait_for(lambda: "gpu-5" in served(), timeout=60, interval=0.02, what="the worker to register gpu-5")
    stopped.stop()
    assert stopped.process.returncode == 0  # it ended by its own `finally`, not by the signal
    assert "gpu-5" not in served()  # a worker that stops says so at once

    killed = Worker(tmp_path / "killed.log", queues="gpu-5").start()
    wait_for(lambda: "gpu-5" in served(), timeout=60, what="the worker to register gpu-5")
    killed.kill()  # no chance to unregister: its row stays, and counts until it is too old
    job_id = gpu_job(client, auth, dataset, 5)
    assert job(client, auth, job_id)["waiting_for"] is None
    # The registration ages out after DISTILL_HEARTBEAT_TIMEOUT_SECONDS (8 s in these tests).
    waiting = wait_for(lambda: job(client, auth, job_id)["waiting_for"], timeout=30, what="the registration to age out")
    assert "distill worker --queues gpu-5" in waiting
    cancel(client, auth, job_id)


def test_the_command_line_shows_a_queued_jobs_place_and_what_it_waits_for(server, client, auth, dataset, tmp_path):
    import json
    import os
    import subprocess
    import sys

    def distill(*args: str) -> subprocess.CompletedProcess:
        token = auth["Authorization"].removeprefix("Bearer ")
        return subprocess.run(
            [sys.executable, "-m", "app.cli", *args, "--url", server, "--token", token],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
            timeout=120,
        )

    ahead = gpu_job(client, auth, dataset, 4)
    spec = tmp_path / "gpu.json"
    spec.write_text(json.dumps(tiny_spec(dataset, method="kd", resources={"accelerator": "gpu", "devices": 4})))
    submitted = distill("submit", str(spec))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()  # stdout stays the id alone, for scripts
    assert "queued on gpu-4: 1 job(s) ahead" in submitted.stderr
    assert "warning: no worker serves queue gpu-4; start one with `distill worker --queues gpu-4`" in submitted.stderr

    status = distill("status", job_id)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["queue_position"] == 1
    assert "queued on gpu-4: 1 job(s) ahead\nwarning: no worker serves queue gpu-4" in status.stderr
    cancel(client, auth, ahead, job_id)
    assert "queued on" not in distill("status", job_id).stderr  # nothing to say once it has left the queue


def test_the_queue_positions_of_a_listing_take_one_query(client, auth, dataset):
    from sqlalchemy import event

    from app import crud
    from app.core.db import session_factory
    from app.models import Job

    job_ids = [gpu_job(client, auth, dataset, 9) for _ in range(4)]
    statements = []

    def record(_connection, _cursor, statement, *_args):
        statements.append(statement)

    with session_factory()() as session:
        jobs = [session.get(Job, job_id) for job_id in job_ids]
        # This session's connection only: the app's background threads share the engine's pool.
        connection = session.connection()
        event.listen(connection, "before_cursor_execute", record)
        try:
            ahead = crud.jobs_ahead(session, jobs)
        finally:
            event.remove(connection, "before_cursor_execute", record)
    assert ahead == {job_id: place for place, job_id in enumerate(job_ids)}
    assert len(statements) == 1, statements
    cancel(client, auth, *job_ids)

"""A user may hold only DISTILL_MAX_STREAMS_PER_USER event streams open; the count drops as streams
end or their clients go away. Tested on a real uvicorn server: the in-process TestClient runs a
request to its end before returning, so it cannot hold streams open side by side."""

import os
import subprocess
import sys
import time
from contextlib import ExitStack

import httpx
import pytest
from helpers import queued_job, wait_for

from worker.engine.launch import free_port

LIMIT = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("uvicorn") / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "DISTILL_MAX_STREAMS_PER_USER": str(LIMIT)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(f"{url}/healthz").status_code == 200
        except httpx.TransportError:
            return process.poll() is not None  # died: reported below

    wait_for(up, timeout=120, what="the API server")
    assert process.poll() is None, "the API server exited; see its log"
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


def user_with_job(ended: bool = False) -> tuple[dict, str]:
    """Bearer headers of a new user and a job of theirs; a queued job's stream stays open."""
    from app import crud, job_status
    from app.core.db import session_factory

    with session_factory()() as session:
        user, token = crud.create_user(session, f"streamer-{time.monotonic_ns()}")
        job = queued_job(session, user, "streamed")
        if ended:
            job_status.request_cancel(session, job.id)
        return {"Authorization": f"Bearer {token}"}, job.id


def open_stream(stack: ExitStack, http: httpx.Client, auth: dict, job_id: str) -> httpx.Response:
    return stack.enter_context(http.stream("GET", f"/api/v1/jobs/{job_id}/events/stream", headers=auth))


@pytest.fixture
def queued_jobs():
    """Jobs made by a test, cancelled afterwards so that no worker of a later test is sent them."""
    made = []
    yield made
    from app import job_status
    from app.core.db import session_factory

    with session_factory()() as session:
        for job_id in made:
            job_status.request_cancel(session, job_id)


@pytest.mark.timeout(120)
def test_streams_past_the_cap_are_refused_until_one_closes(server, queued_jobs):
    alice, alices_job = user_with_job()
    bob, bobs_job = user_with_job()
    queued_jobs += [alices_job, bobs_job]
    with httpx.Client(base_url=server, timeout=10) as http, ExitStack() as everything:
        first = ExitStack()
        everything.enter_context(first)
        assert open_stream(first, http, alice, alices_job).status_code == 200
        assert open_stream(everything, http, alice, alices_job).status_code == 200

        refused = http.get(f"/api/v1/jobs/{alices_job}/events/stream", headers=alice)
        assert refused.status_code == 429
        assert (
            f"{LIMIT} event streams" in refused.json()["message"]
            and "max_streams_per_user" in refused.json()["message"]
        )
        assert open_stream(everything, http, bob, bobs_job).status_code == 200  # another user's cap is their own

        first.close()  # the client goes away mid-stream: its slot comes free

        def accepted() -> bool:
            response = open_stream(everything, http, alice, alices_job)
            return response.status_code == 200

        wait_for(accepted, timeout=15, interval=0.5, what="a stream slot freed by the closed stream")
        assert http.get(f"/api/v1/jobs/{alices_job}/events/stream", headers=alice).status_code == 429  # full again


@pytest.mark.timeout(60)
def test_streams_that_end_by_themselves_free_their_slot(server):
    auth, job_id = user_with_job(ended=True)
    with httpx.Client(base_url=server, timeout=10) as http:
        for _ in range(LIMIT + 2):  # one after another: each ends once it has sent the job's events
            response = http.get(f"/api/v1/jobs/{job_id}/events/stream", headers=auth)
            assert response.status_code == 200 and "event: state" in response.text

"""Service tests run against the real PostgreSQL and Redis on this machine, and real Celery workers.

Each test session gets its own PostgreSQL database and Redis database number, so runs never see
each other's jobs. The settings are environment variables, set here before any app module reads them.
"""

import getpass
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import pytest
import redis
from helpers import PG, Worker, create_database, drop_database, make_user, wait_for

DB_NAME = f"distill_test_{uuid.uuid4().hex[:8]}"


def _claim_redis_db() -> int:
    """A Redis database number (1-15) no other test session on this machine holds: two sessions
    sharing one would consume each other's job messages. Claims live in database 0 for an hour."""
    for number in range(1, 16):
        if redis.Redis(db=0).set(f"distill-tests:db:{number}", DB_NAME, nx=True, ex=3600):
            return number
    raise RuntimeError("all 15 Redis test databases are claimed by other test sessions")


REDIS_DB = _claim_redis_db()
WORK = Path(f"/tmp/{DB_NAME}")
# Specs may name files only inside the operator's roots: here pytest's temporary folders, where the
# tests write their datasets and models (apart from the service's own files under WORK).
ROOTS = str(Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}")

os.environ.update(
    DISTILL_DATABASE_URL=f"{PG}/{DB_NAME}",
    DISTILL_BROKER_URL=f"redis://127.0.0.1:6379/{REDIS_DB}",
    DISTILL_DATA_DIR=str(WORK / "data"),
    DISTILL_ARTIFACTS_DIR=str(WORK / "artifacts"),
    DISTILL_HEARTBEAT_SECONDS="1",
    DISTILL_HEARTBEAT_TIMEOUT_SECONDS="8",
    DISTILL_MAX_ATTEMPTS="3",
    DISTILL_MODEL_ROOTS=ROOTS,
    DISTILL_DATA_ROOTS=ROOTS,
    # Webhook receivers in the tests listen on 127.0.0.1; a failed round is tried again a second later.
    DISTILL_WEBHOOK_ALLOW_PRIVATE="true",
    DISTILL_WEBHOOK_RETRY_SECONDS="1",
    # One client address and a few users send the whole suite's requests, wrong tokens included: the rate
    # limits' own tests set theirs.
    DISTILL_FAILED_SIGN_IN_LIMIT="100000/minute",
    DISTILL_SUBMIT_LIMIT="100000/minute",
    DISTILL_UPLOAD_LIMIT="100000/minute",
)


@pytest.fixture(scope="session", autouse=True)
def database():
    """A fresh, migrated PostgreSQL database and an empty Redis database for this session."""
    create_database(DB_NAME)
    redis.Redis(db=REDIS_DB).flushdb()
    from app.cli.admin import run_migrations

    run_migrations()
    yield
    from app.core.db import get_engine

    get_engine().dispose()
    drop_database(DB_NAME)
    redis.Redis(db=REDIS_DB).flushdb()
    redis.Redis(db=0).delete(f"distill-tests:db:{REDIS_DB}")
    shutil.rmtree(WORK, ignore_errors=True)


@pytest.fixture(scope="session")
def client():
    """The API in-process (lifespan included: the reaper runs)."""
    from fastapi.testclient import TestClient

    from app.main import app

    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def server():
    """The API over HTTP (uvicorn in a thread of this process, so it shares the test database), for
    the browser and the command line."""
    import uvicorn

    from app.main import app
    from worker.engine.launch import free_port

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True, name="uvicorn")
    thread.start()
    wait_for(lambda: srv.started, timeout=30, interval=0.1, what="uvicorn to start")
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def auth() -> dict:
    return make_user()


@pytest.fixture(scope="module")
def no_leftover_jobs():
    """Cancel jobs that earlier tests left queued (API tests queue many and run no worker) or running
    (their worker stopped with the test: the reaper would queue them again); a worker started afterwards
    would otherwise run all of them before the test's own job."""
    from sqlalchemy import select

    from app import job_status
    from app.core.db import session_factory
    from app.models import QUEUED, RUNNING, Job

    with session_factory()() as session:
        for job_id in session.scalars(select(Job.id).where(Job.status.in_((QUEUED, RUNNING)))).all():
            job_status.request_cancel(session, job_id)


@pytest.fixture
def worker(tmp_path):
    w = Worker(tmp_path / "worker.log").start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def served_test_queues():
    """The API tests' jobs go to auto-1 and cpu-2: registered as served (a CPU worker's queues), the way
    a worker's reaper thread does it, so that their events are only the ones each test expects. (Nothing
    consumes the messages: the jobs stay queued. tests/service/test_queues.py is about unserved queues.)"""
    import threading
    from datetime import timedelta

    from helpers import wait_for

    from app import worker_registry
    from app.core.db import session_factory
    from app.reaper import reap_forever

    queues = {"cpu-1", "cpu-2", "auto-1", "auto-2"}
    stop = threading.Event()
    thread = threading.Thread(target=reap_forever, args=(stop, sorted(queues)), daemon=True)
    thread.start()

    def registered() -> bool:
        with session_factory()() as session:
            return queues <= worker_registry.served_queues(session, timedelta(minutes=1))

    wait_for(registered, timeout=30, interval=0.1, what="the test queues to be registered as served")
    yield
    stop.set()
    thread.join(timeout=30)

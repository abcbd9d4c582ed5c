"""What the API's tests (test_api_*.py, test_job_status.py) share: its paths, the requests they make,
direct reads and writes of the database.

They run against the real PostgreSQL and Redis of this session; no Celery worker runs: submitted jobs
stay queued, and the status machine is driven through app.job_status where a test needs it.
"""

from contextlib import contextmanager
from datetime import timedelta

from helpers import tiny_spec
from sqlalchemy import update

JOBS = "/api/v1/jobs"
DATASETS = "/api/v1/datasets"


@contextmanager
def db():
    from app.core.db import session_factory

    with session_factory()() as session:
        yield session


def submit(client, auth, spec, **headers):
    return client.post(JOBS, json=spec, headers={**auth, **headers})


def new_job(client, auth, dataset, **overrides) -> dict:
    response = submit(client, auth, tiny_spec(dataset, **overrides))
    assert response.status_code == 201, response.text
    return response.json()


def events_of(client, auth, job_id, **params) -> list[dict]:
    response = client.get(f"{JOBS}/{job_id}/events", headers=auth, params=params)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def job_count(client, auth) -> int:
    response = client.get(JOBS, headers=auth, params={"limit": 100})
    assert response.status_code == 200, response.text
    return len(response.json()["data"])


def locs(response) -> list[list]:
    return [e["loc"] for e in response.json()["detail"]]


def detail_for(response, loc: list) -> dict:
    matches = [e for e in response.json()["detail"] if e["loc"] == loc]
    assert matches, f"no error at {loc}: {response.json()['detail']}"
    return matches[0]


def set_heartbeat_back(job_id: str, seconds: float = 2, **values) -> None:
    """Move the heartbeat a little into the past: enough for a zero timeout, well inside the 8 s the
    API's own reaper thread uses, so that thread never races these tests."""
    from app.models import Job, utcnow

    with db() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds), **values)
        )
        session.commit()


def dataset_lines(dataset, n: int) -> bytes:
    lines = (dataset / "eval.jsonl").read_text().splitlines()[:n]
    return ("\n".join(lines) + "\n").encode()


def dataset_files():
    from app.core.config import get_settings

    folder = get_settings().resolved_artifacts_dir / "datasets"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def add_checkpoint(job_id: str, step: int):
    """A checkpoint of `job_id` as a worker leaves one: a model directory (its config.json alone) and its row."""
    from app.core.config import get_settings
    from app.job_paths import job_dir
    from app.models import Checkpoint

    directory = job_dir(get_settings(), job_id) / "checkpoints" / f"step-{step:06d}"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    with db() as session:
        session.add(
            Checkpoint(
                job_id=job_id,
                step=step,
                path=str(directory),
                archive_path=str(directory) + ".tar",
                archive_size=0,
                archive_sha256="0" * 64,
                files=[],
            )
        )
        session.commit()
    return directory

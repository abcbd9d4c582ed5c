"""Checkpoints copied to S3-compatible storage and downloaded through presigned redirects.

moto's server stands in for S3 (a real HTTP server speaking the S3 API, in this process)."""

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import boto3
import httpx
import pytest
from helpers import Worker, submit, tiny_spec, wait_for, wait_status
from moto.server import ThreadedMotoServer
from sqlalchemy import select

from app import job_status
from app.core.config import get_settings
from app.core.db import session_factory
from app.core.storage import s3_store
from app.models import Checkpoint, JobEvent
from worker.engine.events import Event
from worker.engine.launch import free_port
from worker.engine.paths import RESUME_STATE_FILE
from worker.reporter import DbReporter

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftover_jobs")]
AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(monkeypatch):
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    bucket = boto3.client("s3", endpoint_url=endpoint)
    bucket.create_bucket(Bucket="models")
    settings = get_settings()  # the API in this process reads the cached settings
    monkeypatch.setattr(settings, "s3_bucket", "models")
    monkeypatch.setattr(settings, "s3_endpoint_url", endpoint)
    s3_store.cache_clear()
    yield bucket, endpoint
    s3_store.cache_clear()
    server.stop()


def run_to_end(client, auth, spec: dict, worker: Worker) -> tuple[str, dict]:
    """Submit `spec`, wait for it to end, stop `worker`: the job's id and its final state."""
    try:
        job_id = submit(client, auth, spec)
        return job_id, wait_status(client, auth, job_id, {"succeeded", "failed"})
    finally:
        worker.stop()


def test_checkpoints_go_to_s3_and_downloads_redirect_there(client, auth, dataset, s3, tmp_path):
    bucket, endpoint = s3
    os.environ.update(DISTILL_S3_BUCKET="models", DISTILL_S3_ENDPOINT_URL=endpoint)
    try:
        worker = Worker(tmp_path / "worker.log").start()
    finally:
        del os.environ["DISTILL_S3_BUCKET"], os.environ["DISTILL_S3_ENDPOINT_URL"]
    job_id, done = run_to_end(
        client, auth, tiny_spec(dataset, checkpoints={"every_steps": 3, "keep": 1}, eval={"every_steps": 0}), worker
    )
    assert done["status"] == "succeeded", done["error"]

    # This job's keys only: a worker started here also runs what earlier tests left queued, into the same bucket.
    prefix = f"distill/jobs/{job_id}/"
    keys = {o["Key"] for o in bucket.list_objects_v2(Bucket="models", Prefix=prefix)["Contents"]}
    assert (
        f"{prefix}archives/step-000006-attempt-1.tar" in keys
        and f"{prefix}checkpoints/step-000006/model.safetensors" in keys
    )
    assert not [k for k in keys if "step-000003" in k]  # pruned with the local copy

    listing = client.get(f"/api/v1/jobs/{job_id}/checkpoints", headers=auth).json()
    response = client.get(f"/api/v1/jobs/{job_id}/checkpoints/latest/archive", headers=auth, follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"].startswith(endpoint)
    first = httpx.get(response.headers["location"], headers={"Range": "bytes=0-99"})
    assert first.status_code == 206 and len(first.content) == 100
    whole = httpx.get(response.headers["location"])
    assert (
        hashlib.sha256(whole.content).hexdigest()
        == listing[-1]["archive_sha256"]
        == response.headers["x-checksum-sha256"]
    )

    single = client.get(
        f"/api/v1/jobs/{job_id}/checkpoints/latest/files/config.json", headers=auth, follow_redirects=False
    )
    assert single.status_code == 307
    assert httpx.get(single.headers["location"]).json()["num_hidden_layers"] == 2
    # Deleting the job deletes its objects too.
    assert client.delete(f"/api/v1/jobs/{job_id}", headers=auth).status_code == 200
    assert bucket.list_objects_v2(Bucket="models", Prefix=prefix)["KeyCount"] == 0


def test_a_job_taken_up_on_another_machine_resumes_from_the_buckets_copy(client, auth, dataset, s3, tmp_path):
    """Two workers with artifacts folders of their own, as on two machines: the first is killed after
    a checkpoint, the second finds nothing of the job on its disk and resumes from the bucket."""
    bucket, endpoint = s3
    env = dict(DISTILL_S3_BUCKET="models", DISTILL_S3_ENDPOINT_URL=endpoint)
    # Beside the service's own artifacts folder: outside the data roots, which the tests' temporary files are in.
    machines = Path(os.environ["DISTILL_ARTIFACTS_DIR"]).parent / f"machines-{uuid.uuid4().hex[:8]}"
    first = Worker(tmp_path / "first.log", DISTILL_ARTIFACTS_DIR=str(machines / "first"), **env).start()
    # Steps enough that training outlasts the bucket copies, which the reporter makes behind it.
    spec = tiny_spec(
        dataset, training={"steps": 100}, checkpoints={"every_steps": 5, "keep": 1}, eval={"every_steps": 0}
    )
    job_id = submit(client, auth, spec)
    prefix = f"distill/jobs/{job_id}/resume/"

    def resume_steps() -> set[str]:
        keys = [o["Key"] for o in bucket.list_objects_v2(Bucket="models", Prefix=prefix).get("Contents", [])]
        return {k.split("/")[4] for k in keys if k.endswith("/trainer_state.json")}

    wait_for(resume_steps, what="a resume state in the bucket")
    first.kill()
    assert not (machines / "second").exists()
    second = Worker(tmp_path / "second.log", DISTILL_ARTIFACTS_DIR=str(machines / "second"), **env).start()
    try:
        done = wait_status(client, auth, job_id, {"succeeded", "failed"}, timeout=400)
    finally:
        second.stop()
    assert done["status"] == "succeeded" and done["attempts"] == 2, done["error"]
    messages = [
        e["message"] for e in client.get(f"/api/v1/jobs/{job_id}/events?limit=1000", headers=auth).json()["data"]
    ]
    resumed = [int(m.split()[3]) for m in messages if m.startswith("resumed from step")]
    assert resumed and resumed[0] >= 5, messages  # not step 0
    assert resume_steps() == {"step-000100"}  # the bucket keeps the newest resume state only
    assert (
        client.get(
            f"/api/v1/jobs/{job_id}/checkpoints/latest/archive", headers=auth, follow_redirects=False
        ).status_code
        == 307
    )


def test_an_upload_is_read_by_a_worker_that_does_not_share_the_apis_folder(client, auth, dataset, s3, tmp_path):
    """The API keeps an upload in its artifacts folder and in the bucket; a worker on another machine
    (an artifacts folder of its own, the API's file out of its reach) trains on the bucket's copy."""
    bucket, endpoint = s3
    body = (dataset / "train.jsonl").read_bytes()
    uploaded = client.post("/api/v1/datasets", params={"name": "train"}, content=body, headers=auth).json()
    key = f"distill/datasets/{uploaded['id']}.jsonl"
    assert bucket.get_object(Bucket="models", Key=key)["Body"].read() == body
    (
        Path(os.environ["DISTILL_ARTIFACTS_DIR"]) / "datasets" / f"{uploaded['id']}.jsonl"
    ).unlink()  # not on the worker's machine

    elsewhere = Path(os.environ["DISTILL_ARTIFACTS_DIR"]).parent / f"machines-{uuid.uuid4().hex[:8]}"
    worker = Worker(
        tmp_path / "worker.log",
        DISTILL_ARTIFACTS_DIR=str(elsewhere),
        DISTILL_S3_BUCKET="models",
        DISTILL_S3_ENDPOINT_URL=endpoint,
    ).start()
    spec = tiny_spec(
        dataset, data={"train": f"dataset:{uploaded['id']}"}, checkpoints={"every_steps": 0}, eval={"every_steps": 0}
    )
    _, done = run_to_end(client, auth, spec, worker)
    assert done["status"] == "succeeded", done["error"]
    assert (elsewhere / "datasets" / f"{uploaded['id']}.jsonl").read_bytes() == body
    # Deleting the upload deletes the bucket's copy too.
    assert client.delete(f"/api/v1/datasets/{uploaded['id']}", headers=auth).status_code == 200
    assert bucket.list_objects_v2(Bucket="models", Prefix=key)["KeyCount"] == 0


def test_a_checkpoint_pruned_while_it_uploads_leaves_nothing_in_the_bucket(client, auth, dataset, s3, tmp_path):
    """The reporter uploads behind the training loop, which may save a newer checkpoint and prune this one
    meanwhile (a slow bucket, a short `checkpoints.every_steps`): what was uploaded of it is deleted, and its
    event says it was replaced, instead of the bucket keeping objects that no checkpoint row points at."""
    bucket, _ = s3
    job_id = submit(client, auth, tiny_spec(dataset))
    with session_factory()() as session:
        assert job_status.claim(session, job_id, "w1") == 1
    job = tmp_path / job_id
    folder, resume = job / "checkpoints" / "step-000003", job / "resume" / "step-000003"
    for directory, names in ((folder, ("config.json", "model.safetensors")), (resume, ("rank-0.pt", "state.json"))):
        directory.mkdir(parents=True)
        for name in names:
            (directory / name).write_bytes(name.encode() * 1000)
    (resume / RESUME_STATE_FILE).write_text("{}")

    reporter = DbReporter(job_id, 1)
    upload = reporter.store.upload

    def upload_then_prune(url, name, path):  # the engine prunes the step while its resume state uploads
        upload(url, name, path)
        if name.startswith("resume/"):
            shutil.rmtree(folder), shutil.rmtree(resume)

    reporter.store.upload = upload_then_prune
    reporter.emit(Event("checkpoint", "checkpoint step 3", data={"step": 3, "path": str(folder)}))
    assert reporter.flush(seconds=30)

    assert bucket.list_objects_v2(Bucket="models", Prefix=f"distill/jobs/{job_id}/").get("KeyCount") == 0
    assert not list((job / "archives").iterdir())
    with session_factory()() as session:
        assert session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all() == []
        (event,) = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "checkpoint"))
        assert event.message == "checkpoint step 3 (since replaced by a newer one)"

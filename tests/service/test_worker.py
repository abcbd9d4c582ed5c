"""Jobs run by real Celery workers against the real PostgreSQL and Redis: success, downloads,
cancellation, failures, and a worker killed mid-job."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from fastapi.testclient import TestClient
from helpers import (
    Worker,
    job,
    make_user,
    rank_processes,
    submit,
    tiny_spec,
    training_process,
    wait_for,
    wait_status,
)
from sqlalchemy import select, update
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.core.db import session_factory
from app.main import app
from app.models import Checkpoint, Job
from distill_client.api import Client
from worker.engine.launch import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftover_jobs")]


def checkpoints(client, auth, job_id) -> list:
    return client.get(f"/api/v1/jobs/{job_id}/checkpoints", headers=auth).json()


def test_job_runs_to_success_and_its_checkpoint_downloads_resumably(client, auth, dataset, worker, tmp_path):
    job_id = submit(client, auth, tiny_spec(dataset))
    done = wait_status(client, auth, job_id, {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"]["step"] == done["progress"]["total_steps"] == 6 and done["attempts"] == 1
    assert done["best_eval"]["scores"]["rouge_l"] >= 0 and "loss" in done["latest_metrics"]

    events = client.get(f"/api/v1/jobs/{job_id}/events", params={"limit": 1000}, headers=auth).json()["data"]
    assert {"state", "metrics", "eval", "checkpoint", "log"} <= {e["type"] for e in events}
    # The training process's log, as a healthy job leaves it: a line per step, and its evaluations.
    log = client.get(f"/api/v1/jobs/{job_id}/logs", headers=auth).text
    assert re.findall(r" step (\d+)/6 minillm: loss ", log) == ["1", "2", "3", "4", "5", "6"], log
    assert "test set, final (step 6): " in log
    # Paths are the job's own, never the server's: its artifacts folder appears nowhere.
    assert [e["data"]["path"] for e in events if e["type"] == "checkpoint"] == [
        "checkpoints/step-000003",
        "checkpoints/step-000006",
    ]
    assert os.environ["DISTILL_ARTIFACTS_DIR"] not in str(events)
    series = client.get(f"/api/v1/jobs/{job_id}/metrics", headers=auth).json()
    assert [p["step"] for p in series["loss"]] == [1, 2, 3, 4, 5, 6] and "reverse_kl" in series
    labels = [e["label"] for e in client.get(f"/api/v1/jobs/{job_id}/evals", headers=auth).json()]
    assert labels[:2] == ["teacher", "initial"] and labels[-2:] == ["final", "best"] and "selection" in labels
    # Every evaluation kept its sample generations: the first 3 prompts of its set, the same for every model.
    kept = client.get(f"/api/v1/jobs/{job_id}/samples", headers=auth).json()
    assert [k["label"] for k in kept] == labels
    for kept_set in ({"teacher", "initial", "final", "best"}, {"selection"}):
        prompts = [[s["prompt"] for s in k["samples"]] for k in kept if k["label"] in kept_set]
        assert len(prompts[0]) == 3 and all(p == prompts[0] for p in prompts)
    assert all(isinstance(s["response"], str) and s["reference"] for k in kept for s in k["samples"])

    listing = checkpoints(client, auth, job_id)
    assert [c["step"] for c in listing] == [3, 6] and listing[-1]["latest"] and sum(c["best"] for c in listing) == 1
    # `best` is the checkpoint the engine chose, as its checkpoint events said; the job shows its test-set scores
    chosen = [
        e["data"]["step"]
        for e in client.get(f"/api/v1/jobs/{job_id}/events", headers=auth).json()["data"]
        if e["type"] == "checkpoint" and e["data"]["best"]
    ]
    assert next(c["step"] for c in listing if c["best"]) == done["best_eval"]["step"] == chosen[-1]
    assert done["best_eval"]["set"] == "test"
    assert {"config.json", "model.safetensors", "README.md"} <= {f["name"] for f in listing[-1]["files"]}

    # An interrupted download: the first part is on disk; the client asks for the rest with Range.
    archive_url = f"/api/v1/jobs/{job_id}/checkpoints/latest/archive"
    head = client.get(archive_url, headers={**auth, "Range": "bytes=0-99999"})
    assert head.status_code == 206 and head.headers["content-range"].startswith("bytes 0-99999/")
    out = tmp_path / "download"
    out.mkdir()
    (out / f"{job_id}-step-6.tar.partial").write_bytes(head.content)
    statuses = []
    http = TestClient(app, headers=auth)
    http.event_hooks["response"].append(lambda r: statuses.append(r.status_code))
    model_dir = Client(http=http).checkpoints.download(job_id, "latest", out)
    assert 206 in statuses  # resumed, not started over
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]

    single = client.get(f"/api/v1/jobs/{job_id}/checkpoints/best/files/config.json", headers=auth)
    assert single.status_code == 200 and single.json()["num_hidden_layers"] == 2

    # Signed links need no token (browsers), support Range, and are bound to their path and time.
    link = client.post(f"/api/v1/jobs/{job_id}/checkpoints/latest/archive/link", headers=auth).json()["url"]
    assert client.get(link).status_code == 200
    assert client.get(link, headers={"Range": "bytes=0-9"}).status_code == 206
    assert client.get(link.replace("signature=", "signature=0")).status_code == 403
    assert client.get(link.replace("/latest/", "/best/")).status_code == 403  # another path
    from app.core.security import signed_url

    tid = int(parse_qs(link.split("?")[1])["tid"][0])
    expired, _ = signed_url(f"/api/v1/jobs/{job_id}/checkpoints/latest/archive", tid, seconds=-1)
    assert client.get(expired).status_code == 403
    file_link = client.post(f"/api/v1/jobs/{job_id}/checkpoints/best/files/config.json/link", headers=auth).json()[
        "url"
    ]
    assert client.get(file_link).json()["num_hidden_layers"] == 2
    other = make_user()
    assert client.post(f"/api/v1/jobs/{job_id}/checkpoints/latest/archive/link", headers=other).status_code == 404

    # Hostile or stale requests are 4xx, never 500s.
    assert client.get(f"/api/v1/jobs/{job_id}/checkpoints/²/archive", headers=auth).status_code == 404
    assert client.get(link.replace("signature=", "signature=é")).status_code == 403
    with session_factory()() as session:
        latest = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)).all()[
            -1
        ]
        Path(latest.archive_path).unlink()
        (Path(latest.path) / "config.json").unlink()
    gone = client.get(f"/api/v1/jobs/{job_id}/checkpoints/latest/archive", headers=auth)
    assert gone.status_code == 404 and "no longer in storage" in gone.json()["message"]
    assert client.get(f"/api/v1/jobs/{job_id}/checkpoints/latest/files/config.json", headers=auth).status_code == 404


def test_a_cancelled_job_keeps_its_checkpoints_resumes_to_success_and_a_new_job_builds_on_its_best_one(
    client, auth, dataset, worker
):
    spec = tiny_spec(
        dataset, training={"steps": 40}, checkpoints={"every_steps": 5, "keep": 2}, eval={"every_steps": 0}
    )
    job_id = submit(client, auth, spec)
    wait_for(lambda: checkpoints(client, auth, job_id), what="a first checkpoint")
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth).json()["status"] == "cancelling"
    cancelled = wait_status(client, auth, job_id, {"cancelled", "failed", "succeeded"}, timeout=120)
    assert cancelled["status"] == "cancelled" and cancelled["progress"]["step"] < 40, cancelled
    assert checkpoints(client, auth, job_id)
    assert client.get(f"/api/v1/jobs/{job_id}/checkpoints/latest/archive", headers=auth).status_code == 200
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth).status_code == 409

    assert client.post(f"/api/v1/jobs/{job_id}/resume", headers=auth).json()["status"] == "queued"
    done = wait_status(client, auth, job_id, {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded" and done["attempts"] == 2, done["error"]
    messages = [
        e["message"]
        for e in client.get(f"/api/v1/jobs/{job_id}/events", params={"limit": 1000}, headers=auth).json()["data"]
    ]
    assert "queued again: resumed by its owner" in messages
    resumed = [int(m.split()[3]) for m in messages if m.startswith("resumed from step")]
    assert resumed and resumed[0] >= 5  # from its newest checkpoint, not from the start
    series = client.get(f"/api/v1/jobs/{job_id}/metrics", headers=auth).json()
    assert [p["step"] for p in series["loss"]] == list(range(1, 41))

    # A new job whose student is that job's best checkpoint, and whose SeqKD data that job's latest one
    # samples (as its teacher); its model card says where both came from.
    best = next(c["step"] for c in checkpoints(client, auth, job_id) if c["best"])
    chained = submit(
        client,
        auth,
        tiny_spec(dataset, method="seqkd", teacher=f"job:{job_id}@latest", student={"model": f"job:{job_id}@best"}),
    )
    done = wait_status(client, auth, chained, {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded", done["error"]
    card = client.get(f"/api/v1/jobs/{chained}/checkpoints/latest/files/README.md", headers=auth).text
    assert f"- Student initialisation: `job:{job_id}@step-{best}`" in card, card
    assert f"- Teacher: `job:{job_id}@step-40`" in card, card


def test_killed_worker_job_is_taken_up_again_and_resumes_from_its_checkpoint(client, auth, dataset, tmp_path):
    first = Worker(tmp_path / "first.log").start()
    spec = tiny_spec(
        dataset, training={"steps": 120}, checkpoints={"every_steps": 10, "keep": 1}, eval={"every_steps": 0}
    )
    job_id = submit(client, auth, spec)
    wait_for(lambda: checkpoints(client, auth, job_id), what="a first checkpoint")
    lost = job(client, auth, job_id)["placement"]["worker"]
    first.kill()
    # The training process dies with its worker (PDEATHSIG), so it cannot race the next attempt.
    wait_for(lambda: not training_process(job_id), timeout=20, what="the orphaned training process to exit")
    assert job(client, auth, job_id)["status"] == "running"
    second = Worker(tmp_path / "second.log").start()
    try:
        done = wait_status(client, auth, job_id, {"succeeded", "failed"}, timeout=400)
    finally:
        second.stop()
    assert done["status"] == "succeeded" and done["attempts"] == 2, done["error"]
    messages = [
        e["message"] for e in client.get(f"/api/v1/jobs/{job_id}/events?limit=1000", headers=auth).json()["data"]
    ]
    assert f"queued again: worker {lost} stopped responding (attempt 1 of 3)" in messages
    assert any(m.startswith("resumed from step") for m in messages)


def test_a_job_whose_worker_is_lost_on_its_last_attempt_fails(client, auth, dataset, tmp_path):
    w = Worker(tmp_path / "w.log").start()
    spec = tiny_spec(dataset, training={"steps": 400}, checkpoints={"every_steps": 5}, eval={"every_steps": 0})
    job_id = submit(client, auth, spec)
    with session_factory()() as session:
        session.execute(update(Job).where(Job.id == job_id).values(max_attempts=1))
        session.commit()
    wait_for(lambda: checkpoints(client, auth, job_id), what="a first checkpoint")
    w.kill()
    done = wait_status(client, auth, job_id, {"failed", "queued", "succeeded"}, timeout=60)
    assert done["status"] == "failed" and done["error"]["code"] == "WorkerLost"


def test_a_crashed_training_process_on_the_last_attempt_fails_the_job_with_the_reason(client, auth, dataset, worker):
    spec = tiny_spec(dataset, training={"steps": 400}, checkpoints={"every_steps": 0}, eval={"every_steps": 0})
    job_id = submit(client, auth, spec)
    with session_factory()() as session:  # on an earlier attempt it would be queued again (the test below)
        session.execute(update(Job).where(Job.id == job_id).values(max_attempts=1))
        session.commit()
    pids = wait_for(lambda: training_process(job_id), what="the training process")
    wait_for(lambda: job(client, auth, job_id)["progress"]["step"] > 0, what="training to start")
    os.kill(pids[0], signal.SIGKILL)  # what the kernel's OOM killer does
    done = wait_status(client, auth, job_id, {"failed", "succeeded"}, timeout=60)
    assert done["error"]["code"] == "ProcessExited" and "SIGKILL" in done["error"]["message"]


def test_a_killed_rank_ends_the_attempt_and_the_job_resumes_and_succeeds(client, auth, dataset, worker):
    """A two-device job, under the DeepSpeed launcher on its own queue: one rank killed, the next attempt
    resumes and the job succeeds."""
    spec = tiny_spec(
        dataset,
        method="kd",
        resources={"devices": 2},
        training={"steps": 40},
        checkpoints={"every_steps": 4, "keep": 1},
        eval={"every_steps": 0},
    )
    job_id = submit(client, auth, spec)
    wait_for(lambda: checkpoints(client, auth, job_id), what="a first checkpoint")
    ranks = wait_for(lambda: len(r := rank_processes(job_id)) == 2 and r, what="both ranks")
    os.kill(ranks[1], signal.SIGKILL)  # rank 0, in a collective with it, loses its peer

    done = wait_status(client, auth, job_id, {"succeeded", "failed"}, timeout=600)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done["error"]
    assert done["queue"] == "auto-2"
    messages = [
        e["message"]
        for e in client.get(f"/api/v1/jobs/{job_id}/events", params={"limit": 1000}, headers=auth).json()["data"]
    ]
    assert "2 process(es) on cpu, precision fp32" in messages
    assert any(m.startswith("queued again: the training process exited") for m in messages), messages
    resumed = [int(m.split()[3]) for m in messages if m.startswith("resumed from step")]
    assert resumed and resumed[0] >= 4
    series = client.get(f"/api/v1/jobs/{job_id}/metrics", headers=auth).json()
    assert [p["step"] for p in series["loss"]] == list(range(1, 41))  # each step recorded once, across both attempts
    assert [c["step"] for c in checkpoints(client, auth, job_id)] == [40]


def test_a_stalled_training_process_is_stopped_and_its_job_retried(client, auth, dataset, tmp_path):
    w = Worker(tmp_path / "w.log", DISTILL_PROGRESS_TIMEOUT_SECONDS="20").start()
    try:
        # Far more steps than the test waits for: the first attempt cannot finish before it is stopped.
        spec = tiny_spec(
            dataset, training={"steps": 100_000}, checkpoints={"every_steps": 5, "keep": 1}, eval={"every_steps": 0}
        )
        job_id = submit(client, auth, spec)
        wait_for(lambda: checkpoints(client, auth, job_id), what="a first checkpoint")
        os.kill(training_process(job_id)[0], signal.SIGSTOP)  # alive, holding its lease, and silent: a hang

        def messages() -> list[str]:
            events = client.get(f"/api/v1/jobs/{job_id}/events", params={"limit": 1000}, headers=auth).json()
            return [e["message"] for e in events["data"]]

        # The second attempt resuming is enough: resumed runs are followed to success by the killed-worker test.
        wait_for(lambda: any(m.startswith("resumed from step") for m in messages()), what="the job resumed")
        assert any(m.startswith("queued again: no step and no event for 20 s") for m in messages())
        assert job(client, auth, job_id)["attempts"] == 2
        assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth).json()["status"] == "cancelling"
        assert wait_status(client, auth, job_id, {"cancelled", "failed", "succeeded"})["status"] == "cancelled"
    finally:
        w.stop()


def test_a_job_past_its_time_limit_is_stopped_and_fails_without_a_retry(client, auth, dataset, tmp_path, monkeypatch):
    """The operator caps how long an attempt may run (here 3 s, while the job is still loading); a spec may
    only ask for less."""
    from app.core.config import get_settings

    monkeypatch.setattr(get_settings(), "max_run_minutes", 60)  # the API's cap
    over = client.post(
        "/api/v1/jobs/validate", json=tiny_spec(dataset, resources={"max_run_minutes": 61}), headers=auth
    )
    assert over.status_code == 422 and over.json()["detail"][0]["loc"] == ["body", "resources", "max_run_minutes"]
    w = Worker(tmp_path / "w.log", DISTILL_MAX_RUN_MINUTES="0.05").start()
    try:
        job_id = submit(client, auth, tiny_spec(dataset, training={"steps": 400}))
        done = wait_status(client, auth, job_id, {"succeeded", "failed"}, timeout=120)
        assert done["status"] == "failed" and done["attempts"] == 1, done
        assert done["error"] == {
            "code": "TimeLimit",
            "message": "ran for 0.05 minutes, its limit: the worker stopped it",
        }
        wait_for(lambda: not training_process(job_id), timeout=20, what="the training process to be gone")
    finally:
        w.stop()


def test_a_model_that_cannot_load_fails_the_job_with_a_useful_error(client, auth, dataset, worker, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "not a number"}')
    job_id = submit(client, auth, tiny_spec(dataset, teacher=str(broken)))
    done = wait_status(client, auth, job_id, {"failed", "succeeded"})
    assert done["status"] == "failed" and done["error"]["code"] and done["error"]["message"]
    assert job(client, auth, job_id)["attempts"] == 1  # a job's own error is not retried


def test_embedded_default_runs_a_job_with_sqlite_and_no_broker_server(tmp_path, dataset):
    """`distill up` with no database or broker configured, driven by `distill submit --wait`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DISTILL_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    port = free_port()
    env.update(DISTILL_DATA_DIR=str(tmp_path / "home"), DISTILL_PORT=str(port))
    up = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        line = up.stdout.readline()
        assert "distill is up" in line, line
        spec = tmp_path / "tiny.yaml"
        import yaml

        spec.write_text(yaml.safe_dump(tiny_spec(dataset)))
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", "submit", str(spec), "--wait"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "succeeded" in result.stdout and (tmp_path / "home" / "distill.db").exists()
        assert (tmp_path / "home" / "broker.db").exists()
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
    time.sleep(0.5)

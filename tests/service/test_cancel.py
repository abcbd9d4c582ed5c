"""Cancel means stop now: a job cancelled while it prepares or evaluates stops within seconds, with
real workers; caches the interrupted work was writing are whole or absent, and the worker goes on to
the next job."""

import json
import os
import signal
import time
import uuid

import pytest
from conftest import WORK
from helpers import Worker, job, submit, tiny_spec, training_process, wait_for

from worker.engine.paths import PROJECT_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftover_jobs")]

REFERENCES = 96  # the training set's prompts, which the teacher answers first
GRACE = 3  # DISTILL_CANCEL_GRACE_SECONDS of these workers: how long a job may take to stop by itself


@pytest.fixture
def cache():
    """A cache of its own for each test, beside the service's files: outside the path roots (pytest's
    temporary folders), which may not overlap a cache of teacher outputs."""
    return WORK / "caches" / uuid.uuid4().hex[:8]


@pytest.fixture
def worker(tmp_path, cache):
    w = Worker(
        tmp_path / "worker.log",
        DISTILL_CACHE_DIR=str(cache),
        DISTILL_CANCEL_GRACE_SECONDS=str(GRACE),
        TORCH_EXTENSIONS_DIR=str(PROJECT_ROOT / ".cache" / "torch_extensions"),
    ).start()
    yield w
    w.stop()


def messages(client, auth, job_id) -> list[str]:
    return [e["message"] for e in client.get(f"/api/v1/jobs/{job_id}/events?limit=1000", headers=auth).json()["data"]]


def wait_message(client, auth, job_id, start: str, timeout=300) -> None:
    wait_for(lambda: any(m.startswith(start) for m in messages(client, auth, job_id)), timeout, what=f"event {start!r}")


def cancel_and_time(client, auth, job_id) -> float:
    started = time.monotonic()
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth).json()["status"] == "cancelling"
    done = wait_for(
        lambda: (j := job(client, auth, job_id))["status"] in ("cancelled", "failed", "succeeded") and j,
        timeout=120,
        interval=0.2,
        what="the job to end",
    )
    assert done["status"] == "cancelled", done
    return time.monotonic() - started


def wait_gone(job_id: str) -> None:
    wait_for(lambda: not training_process(job_id), timeout=10, interval=0.2, what="the training process to exit")


def reference_caches(cache) -> dict[str, list]:
    """Every teacher-response cache file, parsed: a half-written one fails to parse here."""
    return {p.name: json.loads(p.read_text()) for p in (cache / "teacher_responses").glob("*.json")}


def references_spec(dataset) -> dict:
    """SFT on builtin prompts without answers: the teacher writes 96 references of up to 128 tokens
    first (5 to 20 seconds at one thread, by the CPU: the cancel lands in the middle)."""
    seed = uuid.uuid4().int % 10_000  # the cache key includes it: this run's references are new
    return tiny_spec(
        dataset,
        method="sft",
        data={
            "train": "builtin:demo",
            "eval": None,
            "prompt_format": "alpaca",
            "max_prompt_tokens": 128,
            "max_response_tokens": 128,
            "max_train_records": REFERENCES,
        },
        training={"seed": seed},
    )


def test_cancel_while_the_teacher_writes_references(client, auth, dataset, worker, cache):
    spec = references_spec(dataset)
    job_id = submit(client, auth, spec)
    wait_message(client, auth, job_id, f"teacher writes reference responses for {REFERENCES} prompts")
    seconds = cancel_and_time(client, auth, job_id)
    assert seconds < GRACE + 5, f"took {seconds:.1f} s to stop"
    wait_gone(job_id)
    assert any("cancelled while the teacher wrote reference responses" in m for m in messages(client, auth, job_id))
    # The 4 eval references were finished before; the training ones were interrupted: no file.
    assert all(len(r) < REFERENCES for r in reference_caches(cache).values())

    # The worker takes the next job; it needs the same references, finds none, and writes them whole
    # (then trains two steps: what it needs of the references is done by then).
    short = {
        "training": {**spec["training"], "steps": 2},
        "eval": {**spec["eval"], "every_steps": 0},
        "checkpoints": {**spec["checkpoints"], "every_steps": 0},
    }
    again = submit(client, auth, {**spec, **short, "name": "again"})
    done = wait_for(
        lambda: (j := job(client, auth, again))["status"] in ("succeeded", "failed") and j,
        timeout=600,
        what="the next job",
    )
    assert done["status"] == "succeeded", done["error"]
    assert sorted(len(r) for r in reference_caches(cache).values())[-1] == REFERENCES


def test_cancel_during_an_evaluation(client, auth, dataset, worker, cache):
    spec = tiny_spec(
        dataset,
        data={"max_response_tokens": 256},
        eval={"num_prompts": 16, "batch_size": 2, "every_steps": 0},
        training={"seed": uuid.uuid4().int % 10_000},
    )
    job_id = submit(client, auth, spec)
    wait_message(client, auth, job_id, "evaluating the teacher")  # 16 prompts x 256 tokens: seconds of work
    seconds = cancel_and_time(client, auth, job_id)
    assert seconds < GRACE + 5, f"took {seconds:.1f} s to stop"
    assert any("cancelled while evaluating the teacher" in m for m in messages(client, auth, job_id))
    wait_gone(job_id)
    evals = cache / "teacher_evals"
    assert not (evals.exists() and any(evals.iterdir()))  # the interrupted evaluation left nothing, not even a part


def test_a_training_process_that_does_not_stop_is_killed_after_the_grace_period(client, auth, dataset, worker):
    spec = tiny_spec(dataset, training={"steps": 400}, eval={"every_steps": 0}, checkpoints={"every_steps": 0})
    job_id = submit(client, auth, spec)
    wait_for(lambda: job(client, auth, job_id)["progress"]["step"] > 0, what="training to start")
    pid = training_process(job_id)[0]
    os.kill(pid, signal.SIGSTOP)  # hung: it can neither check for the cancel nor handle SIGTERM
    seconds = cancel_and_time(client, auth, job_id)
    assert seconds < GRACE + 1 + 10 + 5  # grace, a heartbeat (1 s here), SIGTERM's wait, slack
    wait_gone(job_id)
    nxt = submit(client, auth, tiny_spec(dataset, name="next", eval={"every_steps": 0}, checkpoints={"every_steps": 0}))
    done = wait_for(
        lambda: (j := job(client, auth, nxt))["status"] in ("succeeded", "failed") and j, what="the next job"
    )
    assert done["status"] == "succeeded", done["error"]

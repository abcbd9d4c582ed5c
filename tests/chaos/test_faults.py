"""The fault campaign: each scenario breaks one part of the running service while jobs are queued or
running, then checks that no job was lost, none ran twice, and no metric point was lost or doubled.

Every check reads the outcome the way a user or operator would: the API over HTTP, and the database
with SQL. Figures go to docs/reliability.md (see conftest.py).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import tiny_spec, training_process, wait_for

pytestmark = pytest.mark.chaos
TERMINAL = {"succeeded", "failed", "cancelled"}


def submit(http: httpx.Client, spec: dict, key: str | None = None) -> str:
    response = http.post("/api/v1/jobs", json=spec, headers={"Idempotency-Key": key} if key else {})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def job(http: httpx.Client, job_id: str) -> dict:
    return http.get(f"/api/v1/jobs/{job_id}").json()


def wait_ended(http: httpx.Client, job_ids: list[str], timeout: float) -> dict[str, dict]:
    """Each job once it has reached a terminal status; one that does not within `timeout` is left
    out of the answer (the caller counts it as lost)."""
    ended: dict[str, dict] = {}

    def all_ended() -> bool:
        for job_id in job_ids:
            if job_id not in ended and (j := job(http, job_id))["status"] in TERMINAL:
                ended[job_id] = j
        return len(ended) == len(job_ids)

    try:
        wait_for(all_ended, timeout=timeout, interval=0.5, what=f"{len(job_ids)} job(s) to end")
    except AssertionError:
        pass  # the caller reports the jobs still open as lost
    return ended


def readyz(stack) -> int:
    try:
        return httpx.get(f"{stack.api_url}/readyz", timeout=10).status_code
    except httpx.HTTPError:
        return 0  # no answer at all


def checkpoint_steps(http: httpx.Client, job_id: str) -> list[int]:
    return [c["step"] for c in http.get(f"/api/v1/jobs/{job_id}/checkpoints").json()]


def resumed_from(http: httpx.Client, job_id: str) -> int | None:
    events = http.get(f"/api/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return next((int(e["message"].split()[3]) for e in events if e["message"].startswith("resumed from step")), None)


# -- 1. a worker SIGKILLed mid-job -----------------------------------------------------------------


@pytest.mark.scenario(
    "worker killed", fault="SIGKILL the worker (its training process dies with it) mid-job, start another"
)
def test_a_killed_worker_job_resumes_from_its_checkpoint_elsewhere(stack, dataset, figures):
    total = 40
    spec = tiny_spec(
        dataset,
        name="chaos-kill",
        training={"steps": total},
        checkpoints={"every_steps": 10, "keep": 1},
        eval={"every_steps": 0},
    )
    first = stack.worker("kill-1")
    with stack.http() as http:
        job_id = submit(http, spec)
        # Killed past a checkpoint, so that the next attempt re-runs steps this one already logged.
        wait_for(
            lambda: (steps := checkpoint_steps(http, job_id)) and job(http, job_id)["progress"]["step"] > steps[-1],
            timeout=300,
            interval=0.2,
            what="a checkpoint and a step past it",
        )
        killed_at_step = job(http, job_id)["progress"]["step"]
        first.kill()
        killed = time.monotonic()
        wait_for(lambda: not training_process(job_id), timeout=20, what="the orphaned training process to exit")
        stack.worker("kill-2")
        wait_for(lambda: stack.claims([job_id])[job_id] >= 2, timeout=120, what="a second attempt")
        figures["taken up again after s"] = time.monotonic() - killed
        ended = wait_ended(http, [job_id], timeout=300)
        figures["recovered after s"] = time.monotonic() - killed
        resumed = resumed_from(http, job_id)
        audit = stack.metric_audit(http, job_id, total)
    figures.update(
        {
            "jobs lost": 1 - len(ended),
            "status": ended.get(job_id, {}).get("status", "not ended"),
            "killed at step": killed_at_step,
            "resumed from step": resumed,
            "steps run twice": killed_at_step - (resumed or 0),
            "claims": stack.claims([job_id])[job_id],
            "metric points": audit["points"],
            "duplicate points": audit["duplicate"],
            "missing points": audit["missing"],
        }
    )
    assert ended and ended[job_id]["status"] == "succeeded", ended
    assert resumed is not None and resumed > 0, "the second attempt did not resume from a checkpoint"
    assert figures["claims"] == 2
    assert audit["duplicate"] == 0 and audit["missing"] == 0, audit


# -- 2. Redis restarted, forgetting its queues ----------------------------------------------------


def broker_messages(stack, job_ids: list[str]) -> int:
    """Messages for these jobs that Redis holds: in the queues' lists or delivered and not yet acknowledged."""
    import redis

    client = redis.Redis(port=stack.redis.port)
    raw = [m for key in client.scan_iter() if client.type(key) == b"list" for m in client.lrange(key, 0, -1)]
    raw += client.hvals("unacked") if client.exists("unacked") else []
    return sum(1 for m in raw for job_id in job_ids if job_id.encode() in m)


@pytest.mark.scenario(
    "broker restarted",
    fault="SIGKILL redis-server (persistence off) and start it again while 1 job runs and 3 wait in its queue",
)
def test_a_broker_restart_loses_no_job_and_runs_none_twice(stack, dataset, figures):
    stack.worker("redis")
    running_spec = tiny_spec(
        dataset,
        name="chaos-redis-running",
        training={"steps": 30},
        checkpoints={"every_steps": 10, "keep": 1},
        eval={"every_steps": 0},
    )
    with stack.http() as http:
        running = submit(http, running_spec)
        wait_for(
            lambda: job(http, running)["progress"]["step"] >= 1, timeout=300, interval=0.2, what="training to start"
        )
        queued = [submit(http, quick_spec(dataset, f"chaos-redis-queued-{i}")) for i in range(3)]
        figures["messages before restart"] = broker_messages(stack, queued)
        stack.redis.kill()
        time.sleep(2)
        stack.redis.start()
        restarted = time.monotonic()
        figures["messages after restart"] = broker_messages(stack, queued)
        ended = wait_ended(http, [running, *queued], timeout=400)
        figures["recovered after s"] = time.monotonic() - restarted
    claims = stack.claims([running, *queued])
    figures.update(
        {
            "jobs": 1 + len(queued),
            "jobs lost": 1 + len(queued) - len(ended),
            "succeeded": sum(j["status"] == "succeeded" for j in ended.values()),
            "claims per job": sorted(claims.values()),
        }
    )
    assert (
        figures["messages before restart"] == len(queued) and figures["messages after restart"] == 0
    )  # the fault happened
    assert figures["jobs lost"] == 0, stack.statuses([running, *queued])
    assert all(j["status"] == "succeeded" for j in ended.values()), ended
    assert set(claims.values()) == {1}, claims  # each ran exactly once


def quick_spec(dataset, name: str) -> dict:
    """A job that ends in seconds: three steps of word-level KD, one test prompt and seed, one checkpoint."""
    return tiny_spec(
        dataset,
        name=name,
        method="kd",
        training={"steps": 3},
        checkpoints={"every_steps": 0},
        eval={"every_steps": 0, "num_prompts": 1, "selection_num_prompts": 1, "seeds": [10], "selection_seeds": [10]},
    )


# -- 3. PostgreSQL restarted ----------------------------------------------------------------------


@pytest.mark.scenario("database restarted", fault="restart PostgreSQL (pg_ctl stop -m fast, 5 s down, start) mid-job")
def test_a_database_restart_mid_job_loses_no_metric_point(stack, dataset, figures):
    total = 40
    spec = tiny_spec(
        dataset,
        name="chaos-postgres",
        training={"steps": total},
        checkpoints={"every_steps": 20, "keep": 1},
        eval={"every_steps": 0},
    )
    stack.worker("postgres")
    with stack.http() as http:
        job_id = submit(http, spec)
        wait_for(lambda: job(http, job_id)["progress"]["step"] >= 3, timeout=300, interval=0.2, what="a few steps")
        stack.postgres.stop("fast")
        down, codes = time.monotonic(), []
        while time.monotonic() - down < 5:  # shorter than the lease (10 s): the same attempt carries on
            codes.append(readyz(stack))
            time.sleep(0.5)
        stack.postgres.start()
        back = time.monotonic()
        figures["outage s"] = back - down
        figures["readyz during outage"] = sorted(set(codes))
        wait_for(lambda: readyz(stack) == 200, timeout=60, interval=0.2, what="/readyz to answer 200")
        figures["ready again after s"] = time.monotonic() - back
        ended = wait_ended(http, [job_id], timeout=300)
        figures["recovered after s"] = time.monotonic() - back
        audit = stack.metric_audit(http, job_id, total)
    figures.update(
        {
            "jobs lost": 1 - len(ended),
            "status": ended.get(job_id, {}).get("status", "not ended"),
            "claims": stack.claims([job_id])[job_id],
            "metric points": audit["points"],
            "duplicate points": audit["duplicate"],
            "missing points": audit["missing"],
        }
    )
    assert codes and set(codes) == {503}, codes
    assert ended and ended[job_id]["status"] == "succeeded", ended
    assert figures["claims"] == 1
    assert audit["duplicate"] == 0 and audit["missing"] == 0, audit


# -- 4. the broker down when a job is submitted ---------------------------------------------------


@pytest.mark.scenario(
    "broker down at submit", fault="SIGKILL redis-server, submit a job, start redis-server 10 s later"
)
def test_a_job_submitted_while_the_broker_is_down_runs_once_it_is_back(stack, dataset, figures):
    worker = stack.worker("submit")
    wait_for(lambda: "ready." in worker.log.read_text(), timeout=120, what="the worker to connect to the broker")
    with stack.http() as http:
        stack.redis.kill()
        down = time.monotonic()
        started = time.monotonic()
        response = http.post(
            "/api/v1/jobs", json=quick_spec(dataset, "chaos-submit"), headers={"Idempotency-Key": "chaos-submit"}
        )
        figures["submit answered"] = response.status_code
        figures["submit took s"] = time.monotonic() - started
        codes = [readyz(stack)]
        while time.monotonic() - down < 10:
            codes.append(readyz(stack))
            time.sleep(1)
        figures["readyz during outage"] = sorted(set(codes))
        stack.redis.start()
        back = time.monotonic()
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        wait_for(lambda: stack.claims([job_id])[job_id] >= 1, timeout=180, what="a worker to take the job")
        figures["taken after broker back s"] = time.monotonic() - back
        ended = wait_ended(http, [job_id], timeout=300)
    figures.update(
        {
            "jobs lost": 1 - len(ended),
            "status": ended.get(job_id, {}).get("status", "not ended"),
            "claims": stack.claims([job_id])[job_id],
        }
    )
    assert set(codes) == {503}, codes
    assert ended and ended[job_id]["status"] == "succeeded", ended
    assert figures["claims"] == 1


# -- 5. a burst of concurrent submits, half of them retries ---------------------------------------


@pytest.mark.scenario(
    "200 concurrent submits",
    fault="200 simultaneous POST /jobs, 100 of them retries carrying another request's Idempotency-Key; 3 workers",
)
def test_concurrent_submits_and_retries_create_and_run_each_job_once(stack, dataset, figures):
    run_id = uuid.uuid4().hex[:8]
    keys = [f"burst-{run_id}-{i}" for i in range(100)]
    requests = [(key, quick_spec(dataset, key)) for key in keys] * 2  # each key sent twice: the request and its retry
    random.Random(0).shuffle(requests)
    barrier = threading.Barrier(len(requests))

    with stack.http() as http:

        def post(request) -> tuple[str, int, str | None]:
            key, spec = request
            with stack.http() as client:  # a client of its own, as 200 separate CI jobs would have
                client.timeout = httpx.Timeout(120)
                barrier.wait()  # all 200 leave together
                try:
                    response = client.post("/api/v1/jobs", json=spec, headers={"Idempotency-Key": key})
                except httpx.HTTPError as err:
                    return key, 0, repr(err)  # no answer at all: reported, not retried
            return (
                key,
                response.status_code,
                response.json().get("id") if response.status_code == 201 else response.text,
            )

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            answers = list(pool.map(post, requests))
        figures["requests"] = len(answers)
        figures["all answered after s"] = time.monotonic() - started
        codes = sorted({code for _, code, _ in answers})
        figures["status codes"] = codes
        ids: dict[str, set] = {}
        for key, code, body in answers:
            if code == 201:
                ids.setdefault(key, set()).add(body)
        job_ids = sorted({job_id for found in ids.values() for job_id in found})
        rows = dict(
            stack.sql("SELECT idempotency_key, count(*) FROM jobs WHERE idempotency_key = ANY(%s) GROUP BY 1", keys)
        )
        figures["distinct jobs created"] = sum(rows.values())
        figures["keys answered with 2 ids"] = sum(len(found) > 1 for found in ids.values())
        assert codes == [201], [a for a in answers if a[1] != 201][:3]
        assert rows == {key: 1 for key in keys}  # one job per key, whatever the interleaving
        assert figures["keys answered with 2 ids"] == 0

        # 100 real runs of even the quickest job would take half an hour on 2 cores: each job is
        # cancelled as soon as a worker has claimed it. Its run is then its training process started
        # and stopped, which is what "exactly once" is about: one claim, never two, none missed.
        stop = threading.Event()
        cancelled: set[str] = set()

        def cancel_once_claimed() -> None:
            while not stop.wait(0.3):
                for (job_id,) in stack.sql("SELECT id FROM jobs WHERE id = ANY(%s) AND status = 'running'", job_ids):
                    if job_id not in cancelled and http.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200:
                        cancelled.add(job_id)

        canceller = threading.Thread(target=cancel_once_claimed, daemon=True)
        canceller.start()
        for i in range(3):
            stack.worker(f"burst-{i}")
        try:
            ended = wait_ended(http, job_ids, timeout=600)
        finally:
            stop.set()
            canceller.join()
        figures["all ended after s"] = time.monotonic() - started
    claims = stack.claims(job_ids)
    figures.update(
        {
            "jobs lost": len(job_ids) - len(ended),
            "ended": sorted({j["status"] for j in ended.values()}),
            "claims 0 / 1 / more": [
                sum(c == 0 for c in claims.values()),
                sum(c == 1 for c in claims.values()),
                sum(c > 1 for c in claims.values()),
            ],
        }
    )
    assert figures["jobs lost"] == 0, {k: v for k, v in stack.statuses(job_ids).items() if v not in TERMINAL}
    assert set(claims.values()) == {1}, {k: v for k, v in claims.items() if v != 1}
    # Cancelled once running; one that ended before its cancel arrived succeeded. Neither failed.
    assert {j["status"] for j in ended.values()} <= {"cancelled", "succeeded"}, ended

"""The fault campaign: each scenario breaks one part of the running service while jobs are queued or
running, then checks that no job was lost, none ran twice, and no metric point was lost or doubled.

Every check reads the outcome the way a user or operator would: the API over HTTP, and the database
with SQL. Figures go to docs/reliability.md (see conftest.py).
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

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


@contextmanager
def cancelling_once_claimed(stack, job_ids: list[str], client_of: Callable[[str], httpx.Client], workers: str):
    """Three workers (`workers`-0, -1, -2) take the jobs, and each job is cancelled by its owner (the
    client `client_of` gives) as soon as a worker has claimed it: 100 real runs of even the quickest job
    would take half an hour on 2 cores. A run is then its training process started and stopped, which
    is what "exactly once" is about: one claim, never two, none missed."""
    stop = threading.Event()
    cancelled: set[str] = set()

    def cancel_once_claimed() -> None:
        while not stop.wait(0.3):
            for (job_id,) in stack.sql("SELECT id FROM jobs WHERE id = ANY(%s) AND status = 'running'", job_ids):
                if (
                    job_id not in cancelled
                    and client_of(job_id).post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
                ):
                    cancelled.add(job_id)

    canceller = threading.Thread(target=cancel_once_claimed, daemon=True)
    canceller.start()
    for i in range(3):
        stack.worker(f"{workers}-{i}")
    try:
        yield
    finally:
        stop.set()
        canceller.join()


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

        with cancelling_once_claimed(stack, job_ids, lambda _: http, "burst"):
            ended = wait_ended(http, job_ids, timeout=600)
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


# -- 6. load: many users at once, stalled uploads, streams and token guessing ---------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.scenario(
    "load",
    fault="200 concurrent submits from 10 users, 50 open event streams, 20 stalled uploads and 40 failed "
    "sign-ins from another address at once, while /healthz and an 11th user's GET /jobs are timed; 3 workers",
)
def test_under_load_health_and_other_users_answer_fast_and_each_job_runs_once(stack, dataset, figures):
    users = [stack.cli("users", "create", f"load-{uuid.uuid4().hex[:6]}").strip() for _ in range(11)]
    observer, submitters = users[0], users[1:]
    host, port = stack.api_url.removeprefix("http://").split(":")

    def client(token: str | None, address: str = "127.0.0.1") -> httpx.Client:
        return httpx.Client(
            base_url=stack.api_url,
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=60,
            transport=httpx.HTTPTransport(local_address=address, limits=httpx.Limits(max_connections=None)),
        )

    # One client per user, shared by that user's threads: each new client builds a TLS context (tens of
    # milliseconds of CPU), and a client for each of 260 requests took most of this machine's 2 cores
    # from the server under test.
    clients = {token: client(token) for token in users}

    # The timers: /healthz and the observer's job list, every 50 ms, from before the load until after it,
    # each from a process of its own (see latency_probe.py).
    timed = {"/healthz": ("/healthz", "-"), "GET /jobs (another user)": ("/api/v1/jobs", observer)}
    probes = {
        name: subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("latency_probe.py")), stack.api_url, token, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, (path, token) in timed.items()
    }

    # 20 uploads that send their headers and one line, then nothing (2 per user, under the cap of 4).
    stalled = []
    for i, token in enumerate(submitters * 2):
        s = socket.create_connection((host, int(port)))
        s.sendall(
            f"POST /api/v1/datasets?name=stall-{i}.jsonl HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/x-ndjson\r\nContent-Length: 100000\r\n\r\n".encode()
            + b'{"prompt": "a", "response": "b"}\n'
        )
        stalled.append(s)

    def guesses() -> list[int]:  # 40 wrong tokens from another address (127.0.0.2 is this machine too)
        with client("dst_wrong", address="127.0.0.2") as guesser:
            return [guesser.get("/api/v1/jobs").status_code for _ in range(40)]

    def submit_one(token: str, name: str) -> tuple[int, str]:
        answer = clients[token].post("/api/v1/jobs", json=quick_spec(dataset, name))
        return answer.status_code, answer.json().get("id", answer.text)

    def streams(token: str, job_id: str) -> int:  # 5 per user, each held open for 10 s
        with clients[token].stream("GET", f"/api/v1/jobs/{job_id}/events/stream") as stream:
            time.sleep(10)
            return stream.status_code

    # A job of each user to follow, then everything at once.
    followed = {token: submit_one(token, "load-followed")[1] for token in submitters}
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=251) as pool:
        guessed = pool.submit(guesses)
        opened = [pool.submit(streams, token, followed[token]) for token in submitters for _ in range(5)]
        submitted = {token: [pool.submit(submit_one, token, f"load-{i}") for i in range(20)] for token in submitters}
        answers = {token: [f.result() for f in futures] for token, futures in submitted.items()}
        stream_codes = [f.result() for f in opened]
        guess_codes = guessed.result()
    figures["load lasted s"] = time.monotonic() - started
    stall_answers = []
    for s in stalled:
        s.settimeout(60)
        stall_answers.append(s.recv(4096).split(b"\r\n", 1)[0].decode())
        s.close()
    timings = {
        name: [json.loads(line) for line in probe.communicate(timeout=120)[0].splitlines()]
        for name, probe in probes.items()
    }
    codes = [t["status"] for ts in timings.values() for t in ts]

    job_ids = [job_id for token in submitters for code, job_id in answers[token] if code == 201]
    figures["jobs created"] = len(job_ids)
    job_ids += list(followed.values())
    submit_codes = sorted({code for token in submitters for code, _ in answers[token]})
    figures.update(
        {
            "submits answered": submit_codes,
            "event streams answered": sorted(set(stream_codes)),
            "failed sign-ins answered (401, 429)": [guess_codes.count(401), guess_codes.count(429)],
            "stalled uploads answered": sorted(set(stall_answers)),
            "timed requests": len(codes),
            "5xx among them": sum(c >= 500 for c in codes),
        }
    )
    seconds = {name: [t["seconds"] for t in ts] for name, ts in timings.items()}
    for name, values in seconds.items():
        figures[f"{name} p50 / p99 / max ms"] = [round(1000 * percentile(values, q)) for q in (0.5, 0.99, 1.0)]
    assert submit_codes == [201] and figures["jobs created"] == 200
    assert set(stream_codes) == {200}
    assert guess_codes == [401] * 20 + [429] * 20  # the address is stopped at its limit, exactly
    assert set(stall_answers) == {"HTTP/1.1 408 Request Timeout"}
    assert set(codes) == {200}
    for name, values in seconds.items():
        assert percentile(values, 0.99) < 0.5, (name, figures[f"{name} p50 / p99 / max ms"])

    # Each job runs exactly once: cancelled by its owner as soon as a worker has claimed it (see
    # cancelling_once_claimed); the jobs are other users' than the campaign's, so they are read with SQL.
    owner = {job_id: token for token in submitters for _, job_id in [*answers[token], (201, followed[token])]}
    try:
        with cancelling_once_claimed(stack, job_ids, lambda job_id: clients[owner[job_id]], "load"):
            wait_for(
                lambda: set(stack.statuses(job_ids).values()) <= TERMINAL,
                timeout=900,
                interval=2,
                what="the 210 jobs to end",
            )
    finally:
        for http in clients.values():
            http.close()
    figures["all ended after s"] = time.monotonic() - started
    claims = stack.claims(job_ids)
    figures["claims 0 / 1 / more"] = [
        sum(c == 0 for c in claims.values()),
        sum(c == 1 for c in claims.values()),
        sum(c > 1 for c in claims.values()),
    ]
    assert set(claims.values()) == {1}, {k: v for k, v in claims.items() if v != 1}
    assert set(stack.statuses(job_ids).values()) <= {"cancelled", "succeeded"}

"""The REST API v1 against the real PostgreSQL and Redis of this session (no Celery worker runs here:
submitted jobs stay queued, and the status machine is driven through app.job_status where a test needs it).
"""

import hashlib
import json
import re
import threading
from contextlib import contextmanager
from datetime import timedelta

import pytest
from helpers import make_user, tiny_spec
from sqlalchemy import func, select, update

JOBS = "/api/v1/jobs"
DATASETS = "/api/v1/datasets"


# -- helpers ------------------------------------------------------------------------------------


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


@pytest.fixture(scope="module", autouse=True)
def a_worker_serves_the_test_queues():
    """The jobs here go to auto-1 and cpu-2: registered as served (a CPU worker's queues), the way a
    worker's reaper thread does it, so that their events are only the ones each test expects. (Nothing consumes the
    messages: the jobs stay queued. tests/service/test_queues.py is about unserved queues.)"""
    from app.reaper import reap_forever

    stop = threading.Event()
    thread = threading.Thread(target=reap_forever, args=(stop, ["cpu-1", "cpu-2", "auto-1", "auto-2"]), daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=30)


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


# -- 1. authentication, health, metrics, docs ---------------------------------------------------

PROTECTED = [
    ("GET", JOBS),
    ("POST", JOBS),
    ("POST", f"{JOBS}/validate"),
    ("GET", f"{JOBS}/job-0000000000000000"),
    ("POST", f"{JOBS}/job-0000000000000000/cancel"),
    ("GET", f"{JOBS}/job-0000000000000000/events"),
    ("GET", f"{JOBS}/job-0000000000000000/events/stream"),
    ("GET", f"{JOBS}/job-0000000000000000/metrics"),
    ("GET", f"{JOBS}/job-0000000000000000/evals"),
    ("GET", f"{JOBS}/job-0000000000000000/samples"),
    ("GET", f"{JOBS}/job-0000000000000000/logs"),
    ("GET", f"{JOBS}/job-0000000000000000/checkpoints"),
    ("GET", f"{JOBS}/job-0000000000000000/checkpoints/latest/archive"),
    ("GET", f"{JOBS}/job-0000000000000000/checkpoints/best/files/config.json"),
    ("POST", f"{JOBS}/job-0000000000000000/checkpoints/latest/archive/link"),
    ("POST", f"{JOBS}/job-0000000000000000/checkpoints/best/files/config.json/link"),
    ("GET", DATASETS),
    ("POST", f"{DATASETS}?name=x.jsonl"),
    ("GET", "/api/v1/me/webhook"),
    ("PUT", "/api/v1/me/webhook"),
]


def test_every_api_route_is_covered_by_the_auth_table(client):
    paths = client.get("/openapi.json").json()["paths"]
    api_routes = {(m.upper(), p) for p, ops in paths.items() if p.startswith("/api/v1") for m in ops}
    covered = {(m, re.sub(r"job-0+", "{job_id}", p.split("?")[0])) for m, p in PROTECTED}
    covered = {
        (m, p.replace("/latest/", "/{step}/").replace("/best/", "/{step}/").replace("config.json", "{name}"))
        for m, p in covered
    }
    assert api_routes == covered


@pytest.mark.parametrize("method,path", PROTECTED)
def test_api_routes_need_a_known_bearer_token(client, dataset, method, path):
    body = tiny_spec(dataset) if (method, path) == ("POST", JOBS) else None
    for headers in ({}, {"Authorization": "Bearer dst_not-a-real-token"}, {"Authorization": "Basic dXNlcjpwYXNz"}):
        response = client.request(method, path, headers=headers, json=body)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"


def test_no_job_is_created_without_a_token(client, dataset):
    with db() as session:
        from app.models import Job

        before = session.scalar(select(func.count()).select_from(Job))
    assert client.post(JOBS, json=tiny_spec(dataset)).status_code == 401
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == before


def test_health_and_readiness_need_no_token(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"database": "ok", "broker": "ok"}


def test_readiness_names_a_down_broker_without_its_error_text(client, monkeypatch):
    from app.core.broker import broker

    monkeypatch.setattr(broker().conf, "broker_url", "redis://:secret-password@127.0.0.1:1/0")  # nothing listens
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"database": "ok", "broker": "unavailable"}  # no host, port or password


def test_prometheus_metrics_count_jobs_and_requests(client, auth, dataset):
    from app.models import Job

    new_job(client, auth, dataset)
    client.get("/healthz")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    with db() as session:
        queued = session.scalar(select(func.count()).select_from(Job).where(Job.status == "queued"))
        cancelled = session.scalar(select(func.count()).select_from(Job).where(Job.status == "cancelled"))
    assert queued >= 1
    assert re.search(rf'^distill_jobs\{{status="queued"\}} {queued}\.0$', text, re.M), text
    assert re.search(rf'^distill_jobs\{{status="cancelled"\}} {cancelled}\.0$', text, re.M), text
    for status in ("running", "cancelling", "succeeded", "failed"):
        assert f'distill_jobs{{status="{status}"}}' in text
    assert "# TYPE distill_queue_depth gauge" in text
    assert re.search(rf'^distill_queue_depth\{{queue="auto-1"\}} {queued}\.0$', text, re.M), text
    assert "# TYPE distill_http_request_seconds histogram" in text
    assert re.search(
        r'^distill_http_request_seconds_bucket\{le="\+Inf",method="GET",route="/healthz",status="200"\} [1-9]',
        text,
        re.M,
    )
    assert re.search(
        r'^distill_http_request_seconds_count\{method="POST",route="[^"]*/jobs",status="201"\} [1-9]', text, re.M
    )


def test_latency_route_label_is_the_full_path_template(client, auth):
    client.get(JOBS, headers=auth)
    client.get(f"{JOBS}/job-doesnotexist0000", headers=auth)
    text = client.get("/metrics").text
    assert 'route="/api/v1/jobs",status="200"' in text, [line for line in text.splitlines() if "_count{" in line]
    assert 'route="/api/v1/jobs/{job_id}",status="404"' in text


def test_openapi_and_docs_are_reachable(client):
    schema = client.get("/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert "/api/v1/jobs" in paths and "/api/v1/datasets" in paths and "/api/v1/jobs/{job_id}/events/stream" in paths
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# -- 2. submit ----------------------------------------------------------------------------------


def test_submit_queues_a_job(client, auth, dataset):
    spec = tiny_spec(dataset)
    response = submit(client, auth, spec)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["id"].startswith("job-")
    assert job["status"] == "queued"
    assert job["queue"] == "auto-1"  # an auto job, and no GPU worker: for whichever worker is free first
    assert job["attempts"] == 0 and job["max_attempts"] == 3
    assert job["progress"] == {"step": 0, "total_steps": spec["training"]["steps"], "eta_seconds": None}
    assert job["started_at"] is None and job["finished_at"] is None and job["error"] is None
    assert job["name"] == "tiny" and job["spec"]["training"]["steps"] == 6
    assert job["spec"]["resources"] == {
        "devices": 1,
        "accelerator": "auto",
        "compile_decoding": False,
    }  # defaults are stored filled in

    fetched = client.get(f"{JOBS}/{job['id']}", headers=auth)
    assert fetched.status_code == 200
    assert fetched.json() == job

    events = events_of(client, auth, job["id"])
    assert [e["type"] for e in events] == ["state"]
    assert events[0]["data"] == {"state": "queued"} and "auto-1" in events[0]["message"]


def test_total_steps_include_the_recovery_stage(client, auth, dataset):
    job = new_job(client, auth, dataset, training={"steps": 8}, recovery={"method": "kd", "steps": 5})
    assert job["progress"]["total_steps"] == 13


def test_queue_names_the_devices(client, auth, dataset):
    job = new_job(client, auth, dataset, resources={"devices": 2, "accelerator": "cpu"})
    assert job["queue"] == "cpu-2"


def test_submit_with_a_missing_job_id_is_404(client, auth):
    response = client.get(f"{JOBS}/job-doesnotexist0000", headers=auth)
    assert response.status_code == 404


INVALID = {
    "unknown top-level field": (lambda d: {**tiny_spec(d), "trainig": {"steps": 3}}, ["body", "trainig"], "extra"),
    "wrong nested type": (lambda d: tiny_spec(d, training={"steps": "x"}), ["body", "training", "steps"], "integer"),
    "missing student": (
        lambda d: {k: v for k, v in tiny_spec(d).items() if k != "student"},
        ["body", "student"],
        "required",
    ),
    "teacher directory missing": (
        lambda d: tiny_spec(d, teacher=str(d / "no-such-teacher")),
        ["body", "teacher"],
        "no such model directory",
    ),
    "teacher outside the roots": (
        lambda d: tiny_spec(d, teacher="/nonexistent/teacher-model"),
        ["body", "teacher"],
        "not a model directory this service may read",
    ),
    "unknown builtin model": (
        lambda d: tiny_spec(d, student={"model": "builtin:nope"}),
        ["body", "student", "model"],
        "unknown builtin model",
    ),
    "missing train file": (
        lambda d: tiny_spec(d, data={"train": str(d / "missing.jsonl")}),
        ["body", "data", "train"],
        "no such file",
    ),
    "missing eval file": (
        lambda d: tiny_spec(d, data={"eval": str(d / "missing.jsonl")}),
        ["body", "data", "eval"],
        "no such file",
    ),
    "unknown dataset": (
        lambda d: tiny_spec(d, data={"train": "dataset:ds-nope"}),
        ["body", "data", "train"],
        "no such uploaded dataset",
    ),
    "rollouts not divisible": (
        lambda d: tiny_spec(d, minillm={"rollouts_per_phase": 5}),
        ["body", "minillm", "rollouts_per_phase"],
        "multiple",
    ),
    "rollouts vs devices": (
        lambda d: tiny_spec(d, resources={"devices": 3}),
        ["body", "minillm", "rollouts_per_phase"],
        "(6)",
    ),
    "steps beyond 32 bits": (
        lambda d: tiny_spec(d, training={"steps": 2**31}),
        ["body", "training", "steps"],
        "2147483647",
    ),
    "NUL in the name": (lambda d: {**tiny_spec(d), "name": "a\x00b"}, ["body", "name"], "NUL"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_specs_are_422_naming_the_field_and_store_nothing(client, auth, dataset, case):
    make, loc, words = INVALID[case]
    new_job(client, auth, dataset)
    before = job_count(client, auth)
    response = submit(client, auth, make(dataset))
    assert response.status_code == 422, response.text
    error = detail_for(response, loc)
    assert words.lower() in error["msg"].lower(), error
    assert job_count(client, auth) == before


def test_a_number_json_reads_as_infinity_is_422_naming_the_field(client, auth, dataset):
    """1e999 is valid JSON and Python reads it as inf; no float field takes it."""
    before = job_count(client, auth)
    body = json.dumps(tiny_spec(dataset, training={"learning_rate": 12345.0})).replace("12345.0", "1e999")
    response = client.post(JOBS, content=body, headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert "finite" in detail_for(response, ["body", "training", "learning_rate"])["msg"]
    assert job_count(client, auth) == before


def test_event_cursors_beyond_64_bits_are_422_naming_the_parameter(client, auth, dataset):
    job = new_job(client, auth, dataset)
    response = client.get(f"{JOBS}/{job['id']}/events", params={"after": 2**63}, headers=auth)
    assert response.status_code == 422 and detail_for(response, ["query", "after"])
    stream = client.get(f"{JOBS}/{job['id']}/events/stream", params={"after": 2**63}, headers=auth)
    assert stream.status_code == 422


def test_a_user_past_their_active_job_limit_gets_a_429_and_retries_still_answer(client, dataset, monkeypatch):
    from app.core.config import get_settings

    monkeypatch.setattr(get_settings(), "max_active_jobs_per_user", 2)
    user = make_user()
    first = submit(client, user, tiny_spec(dataset, name="one"), **{"Idempotency-Key": "quota-1"})
    assert submit(client, user, tiny_spec(dataset, name="two")).status_code == 201
    third = submit(client, user, tiny_spec(dataset, name="three"))
    assert third.status_code == 429 and "2 jobs queued or running" in third.json()["message"]
    assert job_count(client, user) == 2
    retry = submit(client, user, tiny_spec(dataset, name="one"), **{"Idempotency-Key": "quota-1"})
    assert retry.status_code == 201 and retry.json()["id"] == first.json()["id"]  # a retry is not a new job
    assert submit(client, make_user(), tiny_spec(dataset)).status_code == 201  # the limit is per user
    client.post(f"{JOBS}/{first.json()['id']}/cancel", headers=user)  # one ends: room for another
    assert submit(client, user, tiny_spec(dataset, name="three")).status_code == 201


def test_a_user_past_their_dataset_bytes_gets_a_429_and_nothing_is_stored(client, monkeypatch):
    from app.core.config import get_settings

    body = b'{"instruction": "a", "output": "b"}\n' * 10
    monkeypatch.setattr(get_settings(), "max_dataset_bytes_per_user", len(body) * 2 + 5)
    user = make_user()
    for _ in range(2):
        assert client.post(DATASETS, params={"name": "d.jsonl"}, content=body, headers=user).status_code == 201
    files_before = dataset_files()
    refused = client.post(DATASETS, params={"name": "d.jsonl"}, content=body, headers=user)
    assert refused.status_code == 429 and "5 are left" in refused.json()["message"]
    assert len(client.get(DATASETS, headers=user).json()) == 2 and dataset_files() == files_before
    assert client.post(DATASETS, params={"name": "d.jsonl"}, content=body, headers=make_user()).status_code == 201


def test_all_preflight_problems_are_reported_together(client, auth, dataset):
    spec = tiny_spec(
        dataset, teacher="/nonexistent/teacher", data={"train": "dataset:ds-nope"}, minillm={"rollouts_per_phase": 3}
    )
    response = submit(client, auth, spec)
    assert response.status_code == 422
    assert sorted(map(tuple, locs(response))) == sorted(
        [("body", "teacher"), ("body", "data", "train"), ("body", "minillm", "rollouts_per_phase")]
    )


def test_non_json_body_is_422(client, auth):
    response = client.post(JOBS, content=b"{not json", headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 422


# -- 3. idempotency -----------------------------------------------------------------------------


def test_idempotency_key_returns_the_same_job(client, auth, dataset):
    spec = tiny_spec(dataset)
    first = submit(client, auth, spec, **{"Idempotency-Key": "key-1"})
    second = submit(client, auth, spec, **{"Idempotency-Key": "key-1"})
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] == second.json()["id"]
    assert job_count(client, auth) == 1
    # and only one "queued" event: the repeat did not enqueue the job again
    assert [e["data"]["state"] for e in events_of(client, auth, first.json()["id"])] == ["queued"]


def test_idempotency_key_ignores_key_order_and_explicit_defaults(client, auth, dataset):
    spec = tiny_spec(dataset)
    first = submit(client, auth, spec, **{"Idempotency-Key": "key-order"})
    reordered = dict(reversed(list(spec.items())))
    reordered["resources"] = {
        "accelerator": "auto",
        "devices": 1,
        "compile_decoding": False,
    }  # the defaults, spelled out
    second = submit(client, auth, reordered, **{"Idempotency-Key": "key-order"})
    assert second.status_code == 201 and second.json()["id"] == first.json()["id"]
    assert job_count(client, auth) == 1


def test_concurrent_requests_with_one_key_make_one_job(client, auth, dataset):
    from concurrent.futures import ThreadPoolExecutor

    spec = tiny_spec(dataset)
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: submit(client, auth, spec, **{"Idempotency-Key": "key-race"}), range(4)))
    assert [r.status_code for r in responses] == [201] * 4, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert job_count(client, auth) == 1
    assert len(events_of(client, auth, responses[0].json()["id"])) == 1


def test_idempotency_key_with_another_body_is_409(client, auth, dataset):
    first = submit(client, auth, tiny_spec(dataset), **{"Idempotency-Key": "key-2"})
    assert first.status_code == 201
    other = submit(client, auth, tiny_spec(dataset, training={"steps": 7}), **{"Idempotency-Key": "key-2"})
    assert other.status_code == 409, other.text
    assert job_count(client, auth) == 1
    # a different key is a new job
    third = submit(client, auth, tiny_spec(dataset), **{"Idempotency-Key": "key-3"})
    assert third.status_code == 201 and third.json()["id"] != first.json()["id"]
    # no key at all: always a new job
    assert submit(client, auth, tiny_spec(dataset)).json()["id"] != first.json()["id"]
    assert job_count(client, auth) == 3


def test_idempotency_keys_are_per_user(client, auth, dataset):
    other = make_user()
    mine = submit(client, auth, tiny_spec(dataset), **{"Idempotency-Key": "shared-key"})
    theirs = submit(client, other, tiny_spec(dataset), **{"Idempotency-Key": "shared-key"})
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["id"] != theirs.json()["id"]
    assert job_count(client, auth) == job_count(client, other) == 1
    # and a different body under that key for the other user is their own conflict, not mine
    assert (
        submit(
            client, other, tiny_spec(dataset, training={"steps": 7}), **{"Idempotency-Key": "shared-key"}
        ).status_code
        == 409
    )


def test_idempotency_key_over_200_characters_is_422(client, auth, dataset):
    response = submit(client, auth, tiny_spec(dataset), **{"Idempotency-Key": "k" * 201})
    assert response.status_code == 422
    assert job_count(client, auth) == 0


def test_a_failed_validation_does_not_reserve_the_key(client, auth, dataset):
    bad = submit(client, auth, tiny_spec(dataset, training={"steps": 0}), **{"Idempotency-Key": "key-4"})
    assert bad.status_code == 422
    good = submit(client, auth, tiny_spec(dataset), **{"Idempotency-Key": "key-4"})
    assert good.status_code == 201


# -- 4. listing ---------------------------------------------------------------------------------


def test_listing_pages_newest_first(client, auth, dataset):
    ids = [new_job(client, auth, dataset, name=f"job-{i}")["id"] for i in range(5)]
    newest_first = ids[::-1]

    page = client.get(JOBS, headers=auth, params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == newest_first[:2]
    assert page["has_more"] is True

    seen, after, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = client.get(JOBS, headers=auth, params=params).json()
        pages += 1
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
        assert pages < 10
    assert seen == newest_first
    assert pages == 3

    exact = client.get(JOBS, headers=auth, params={"limit": 5}).json()
    assert [j["id"] for j in exact["data"]] == newest_first and exact["has_more"] is False
    default = client.get(JOBS, headers=auth).json()
    assert [j["id"] for j in default["data"]] == newest_first and default["has_more"] is False


def test_listing_filters_by_status(client, auth, dataset):
    ids = [new_job(client, auth, dataset)["id"] for _ in range(3)]
    assert client.post(f"{JOBS}/{ids[1]}/cancel", headers=auth).status_code == 200
    cancelled = client.get(JOBS, headers=auth, params={"status": "cancelled"}).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[1]]
    queued = client.get(JOBS, headers=auth, params={"status": "queued"}).json()
    assert [j["id"] for j in queued["data"]] == [ids[2], ids[0]]
    assert client.get(JOBS, headers=auth, params={"status": "running"}).json() == {"data": [], "has_more": False}
    # a status filter combines with paging
    page = client.get(JOBS, headers=auth, params={"status": "queued", "limit": 1}).json()
    assert [j["id"] for j in page["data"]] == [ids[2]] and page["has_more"] is True
    page = client.get(JOBS, headers=auth, params={"status": "queued", "limit": 1, "after": ids[2]}).json()
    assert [j["id"] for j in page["data"]] == [ids[0]] and page["has_more"] is False


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"limit": "x"}, {"status": "paused"}])
def test_listing_rejects_bad_parameters(client, auth, params):
    response = client.get(JOBS, headers=auth, params=params)
    assert response.status_code == 422
    assert locs(response)[0][0] == "query"


def test_listing_limit_100_is_accepted(client, auth):
    assert client.get(JOBS, headers=auth, params={"limit": 100}).status_code == 200


# -- 5. isolation between users -----------------------------------------------------------------


def test_other_users_jobs_are_invisible(client, auth, dataset):
    from app.schemas import error_body

    job = new_job(client, auth, dataset)
    other = make_user()
    for method, suffix in [
        ("GET", ""),
        ("GET", "/events"),
        ("GET", "/events/stream"),
        ("GET", "/metrics"),
        ("GET", "/evals"),
        ("GET", "/samples"),
        ("GET", "/checkpoints"),
        ("GET", "/checkpoints/latest/archive"),
        ("GET", "/checkpoints/best/files/config.json"),
        ("POST", "/cancel"),
    ]:
        response = client.request(method, f"{JOBS}/{job['id']}{suffix}", headers=other)
        assert response.status_code == 404, (suffix, response.text)
        assert response.json() == error_body(404, f"no job {job['id']}")  # exactly like a job that does not exist
    assert client.get(JOBS, headers=other).json() == {"data": [], "has_more": False}
    # the cancel attempt changed nothing
    assert client.get(f"{JOBS}/{job['id']}", headers=auth).json()["status"] == "queued"
    # and another user's job id is no paging anchor
    assert client.get(JOBS, headers=other, params={"after": job["id"]}).json()["data"] == []


def test_other_users_datasets_are_invisible(client, auth, dataset):
    uploaded = client.post(DATASETS, params={"name": "mine.jsonl"}, content=dataset_lines(dataset, 4), headers=auth)
    assert uploaded.status_code == 201
    other = make_user()
    assert client.get(DATASETS, headers=other).json() == []
    assert [d["id"] for d in client.get(DATASETS, headers=auth).json()] == [uploaded.json()["id"]]
    # nor usable by reference in the other user's job
    response = submit(client, other, tiny_spec(dataset, data={"train": f"dataset:{uploaded.json()['id']}"}))
    assert response.status_code == 422
    assert "no such uploaded dataset" in detail_for(response, ["body", "data", "train"])["msg"]


# -- 6. cancel ----------------------------------------------------------------------------------


def test_cancel_a_queued_job(client, auth, dataset):
    job = new_job(client, auth, dataset)
    response = client.post(f"{JOBS}/{job['id']}/cancel", headers=auth)
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert client.get(f"{JOBS}/{job['id']}", headers=auth).json()["status"] == "cancelled"

    again = client.post(f"{JOBS}/{job['id']}/cancel", headers=auth)
    assert again.status_code == 409, again.text
    assert "cancelled" in again.json()["message"]

    states = [e["data"]["state"] for e in events_of(client, auth, job["id"]) if e["type"] == "state"]
    assert states == ["queued", "cancelled"]

    # a worker that receives the message later cannot start it
    from app import job_status

    with db() as session:
        assert job_status.claim(session, job["id"], "late-worker") is None
    assert client.get(f"{JOBS}/{job['id']}", headers=auth).json()["status"] == "cancelled"


def test_cancel_a_running_job_asks_the_worker(client, auth, dataset):
    from app import job_status

    job = new_job(client, auth, dataset)
    with db() as session:
        attempt = job_status.claim(session, job["id"], "w")
    assert attempt == 1
    running = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert running["status"] == "running" and running["attempts"] == 1 and running["started_at"] is not None

    response = client.post(f"{JOBS}/{job['id']}/cancel", headers=auth)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelling" and response.json()["finished_at"] is None
    # asking again while it stops is not an error
    again = client.post(f"{JOBS}/{job['id']}/cancel", headers=auth)
    assert again.status_code == 200 and again.json()["status"] == "cancelling"

    with db() as session:
        assert job_status.is_active(session, job["id"], attempt) == "cancelling"
        assert job_status.heartbeat(session, job["id"], attempt) is True
        assert job_status.finish(session, job["id"], attempt + 1, "cancelled") is False  # not its attempt
        assert job_status.finish(session, job["id"], attempt, "cancelled") is True
        assert job_status.heartbeat(session, job["id"], attempt) is False
    done = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert done["status"] == "cancelled" and done["finished_at"] is not None
    assert client.post(f"{JOBS}/{job['id']}/cancel", headers=auth).status_code == 409
    states = [e["data"]["state"] for e in events_of(client, auth, job["id"])]
    assert states == ["queued", "running", "cancelling", "cancelled"]


def test_terminal_statuses_are_final(client, auth, dataset):
    from app import job_status

    job = new_job(client, auth, dataset)
    with db() as session:
        attempt = job_status.claim(session, job["id"], "w")
        assert job_status.finish(session, job["id"], attempt, "cancelled") is False  # cancelled only from cancelling
        assert job_status.finish(session, job["id"], attempt, "succeeded") is True
        for status in ("failed", "cancelled", "succeeded"):
            assert job_status.finish(session, job["id"], attempt, status, {"code": "X", "message": "y"}) is False
        assert job_status.request_cancel(session, job["id"]) is None
        assert job_status.claim(session, job["id"], "w2") is None
        assert job_status.heartbeat(session, job["id"], attempt) is False
    done = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert done["status"] == "succeeded" and done["error"] is None
    assert client.post(f"{JOBS}/{job['id']}/cancel", headers=auth).status_code == 409


def test_a_failed_job_reports_its_error(client, auth, dataset):
    from app import job_status

    job = new_job(client, auth, dataset)
    with db() as session:
        attempt = job_status.claim(session, job["id"], "w")
        assert job_status.finish(session, job["id"], attempt, "failed", {"code": "OOM", "message": "out of memory"})
    failed = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert failed["status"] == "failed" and failed["error"] == {"code": "OOM", "message": "out of memory"}
    last = events_of(client, auth, job["id"])[-1]
    assert last["level"] == "error" and last["data"]["state"] == "failed"


# -- 7. status machine: claim and reaping -------------------------------------------------------


def test_claim_once(client, auth, dataset):
    from app import job_status

    job = new_job(client, auth, dataset)
    with db() as session:
        assert job_status.claim(session, job["id"], "w1") == 1
        assert job_status.claim(session, job["id"], "w2") is None  # a redelivered duplicate is ignored
        assert job_status.finish(session, job["id"], 1, "succeeded")
    fetched = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert fetched["attempts"] == 1
    assert [e["data"]["state"] for e in events_of(client, auth, job["id"])] == ["queued", "running", "succeeded"]


def test_reaper_requeues_a_lost_job_while_attempts_remain(client, auth, dataset):
    from app import job_status

    job = new_job(client, auth, dataset)
    with db() as session:
        attempt = job_status.claim(session, job["id"], "w1")
    set_heartbeat_back(job["id"])
    with db() as session:
        assert job["id"] not in job_status.reap_stale(session, timedelta(minutes=1))  # not stale yet
        assert job["id"] in job_status.reap_stale(session, timedelta(seconds=0))
        # the lost attempt can no longer report
        assert job_status.heartbeat(session, job["id"], attempt) is False
        assert job_status.finish(session, job["id"], attempt, "succeeded") is False
    requeued = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert requeued["status"] == "queued" and requeued["attempts"] == 1
    last = events_of(client, auth, job["id"])[-1]
    assert last["data"]["state"] == "queued" and last["level"] == "warning"
    with db() as session:  # the next attempt takes it
        assert job_status.claim(session, job["id"], "w2") == 2
        assert job_status.finish(session, job["id"], 2, "succeeded")


def test_a_worker_whose_clock_is_two_minutes_slow_keeps_its_job(client, auth, dataset, monkeypatch):
    """Heartbeats and the reaper read the database's clock, not each machine's own."""
    from datetime import datetime, timezone

    import app.crud
    import app.job_status
    import app.models
    from app import job_status
    from app.core.db import db_now

    job = new_job(client, auth, dataset)
    slow = lambda: datetime.now(timezone.utc) - timedelta(minutes=2)  # noqa: E731
    for module in (app.models, app.crud, app.job_status):  # wherever a machine clock could be read
        monkeypatch.setattr(module, "utcnow", slow, raising=False)
    with db() as session:  # the slow worker claims the job and beats
        attempt = job_status.claim(session, job["id"], "slow-worker")
        assert job_status.heartbeat(session, job["id"], attempt)
        beat = session.get(app.models.Job, job["id"], populate_existing=True).heartbeat_at
        assert abs((db_now(session) - beat).total_seconds()) < 30  # the database's time, not the slow clock's
    monkeypatch.undo()
    with db() as session:  # a reaper with a correct clock and a one-minute lease
        assert job["id"] not in job_status.reap_stale(session, timedelta(minutes=1))
    assert client.get(f"{JOBS}/{job['id']}", headers=auth).json()["status"] == "running"
    with db() as session:
        job_status.finish(session, job["id"], attempt, "succeeded")


def test_reaper_fails_a_job_out_of_attempts(client, auth, dataset):
    from app import job_status

    job = new_job(client, auth, dataset)
    with db() as session:
        job_status.claim(session, job["id"], "w1")
    set_heartbeat_back(job["id"], attempts=3)
    with db() as session:
        assert job["id"] not in job_status.reap_stale(session, timedelta(seconds=0))
    failed = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert failed["status"] == "failed" and failed["finished_at"] is not None
    assert failed["error"]["code"] == "WorkerLost"
    last = events_of(client, auth, job["id"])[-1]
    assert last["data"]["state"] == "failed" and last["data"]["error"]["code"] == "WorkerLost"


def test_reaper_ends_a_cancelling_job_whose_worker_died(client, auth, dataset):
    from app import job_status

    job = new_job(client, auth, dataset)
    with db() as session:
        job_status.claim(session, job["id"], "w1")
    assert client.post(f"{JOBS}/{job['id']}/cancel", headers=auth).json()["status"] == "cancelling"
    set_heartbeat_back(job["id"])
    with db() as session:
        assert job["id"] not in job_status.reap_stale(session, timedelta(seconds=0))
    done = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert done["status"] == "cancelled" and done["finished_at"] is not None
    assert events_of(client, auth, job["id"])[-1]["data"]["state"] == "cancelled"


def test_reaper_leaves_fresh_and_queued_jobs_alone(client, auth, dataset):
    from app import job_status

    queued = new_job(client, auth, dataset)
    running = new_job(client, auth, dataset)
    with db() as session:
        job_status.claim(session, running["id"], "w1")
        reaped = job_status.reap_stale(session, timedelta(seconds=60))
        assert queued["id"] not in reaped and running["id"] not in reaped
        assert job_status.finish(session, running["id"], 1, "succeeded")
    assert client.get(f"{JOBS}/{queued['id']}", headers=auth).json()["status"] == "queued"
    assert client.get(f"{JOBS}/{running['id']}", headers=auth).json()["status"] == "succeeded"


# -- 8. datasets --------------------------------------------------------------------------------


def test_upload_a_dataset_and_use_it(client, auth, dataset):
    body = dataset_lines(dataset, 6)
    response = client.post(
        DATASETS, params={"name": "x.jsonl"}, content=body, headers={**auth, "Content-Type": "application/x-ndjson"}
    )
    assert response.status_code == 201, response.text
    uploaded = response.json()
    assert uploaded["id"].startswith("ds-") and uploaded["name"] == "x.jsonl"
    assert uploaded["num_records"] == 6
    assert uploaded["size_bytes"] == len(body)
    assert uploaded["sha256"] == hashlib.sha256(body).hexdigest()
    assert f"{uploaded['id']}.jsonl" in dataset_files()
    assert not [f for f in dataset_files() if f.endswith(".partial")]

    listed = client.get(DATASETS, headers=auth).json()
    assert [d["id"] for d in listed] == [uploaded["id"]]
    assert listed[0] == uploaded

    ref = f"dataset:{uploaded['id']}"
    job = submit(client, auth, tiny_spec(dataset, data={"train": ref, "eval": ref}))
    assert job.status_code == 201, job.text
    assert job.json()["spec"]["data"]["train"] == ref


def test_upload_accepts_the_prompt_response_layout_and_blank_lines(client, auth):
    body = b'{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n'
    response = client.post(DATASETS, params={"name": "pr.jsonl"}, content=body, headers=auth)
    assert response.status_code == 201, response.text
    assert response.json()["num_records"] == 2


def test_upload_a_pretraining_corpus_and_use_it(client, auth, dataset):
    body = b'{"text": "Some free text."}\n{"text": "More of it."}\n'
    response = client.post(DATASETS, params={"name": "corpus.jsonl"}, content=body, headers=auth)
    assert response.status_code == 201, response.text
    assert response.json()["num_records"] == 2
    ref = f"dataset:{response.json()['id']}"
    job = submit(client, auth, tiny_spec(dataset, data={"pretrain": ref}))
    assert job.status_code == 201, job.text
    assert job.json()["spec"]["data"]["pretrain"] == ref
    missing = submit(client, auth, tiny_spec(dataset, data={"pretrain": "dataset:ds-nope"}))
    assert detail_for(missing, ["body", "data", "pretrain"])["msg"] == "dataset:ds-nope: no such uploaded dataset"


BAD_UPLOADS = {
    "line 3 not json": (b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{oops\n', ":3:"),
    "line 2 not a record": (b'{"instruction": "a", "output": "b"}\n[1, 2]\n', ":2:"),
    "line 1 no instruction": (b'{"foo": "bar"}\n', ":1:"),
    "empty": (b"", "no records"),
    "not utf-8": (b'{"instruction": "\xff\xfe"}\n', "utf-8"),
    "corpus line 2 not text": (b'{"text": "a"}\n{"text": 5}\n', ":2:"),
    "line 2 nested 100,000 deep": (
        b'{"instruction": "a", "output": "b"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n",
        ":2: not valid JSON: nested too deeply",
    ),
    "line 1 a 5,000-digit integer": (b'{"instruction": "a", "output": ' + b"9" * 5000 + b"}\n", ":1: not valid JSON"),
    "first line nested deep": (b"[" * 100_000 + b"]" * 100_000 + b"\n", ":1: not valid JSON: nested too deeply"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_are_422_and_store_nothing(client, auth, case):
    body, words = BAD_UPLOADS[case]
    files_before = dataset_files()
    response = client.post(DATASETS, params={"name": "bad.jsonl"}, content=body, headers=auth)
    assert response.status_code == 422, response.text
    message = response.json()["detail"][0]["msg"]
    assert words in message, message
    if words.startswith(":"):
        assert message.startswith(f"bad.jsonl{words}"), message  # named by upload name, not the server's path
    assert "/" not in message.split(":")[0]
    assert client.get(DATASETS, headers=auth).json() == []
    assert dataset_files() == files_before


def test_upload_needs_a_name(client, auth, dataset):
    response = client.post(DATASETS, content=dataset_lines(dataset, 2), headers=auth)
    assert response.status_code == 422
    assert ["query", "name"] in locs(response)
    assert client.get(DATASETS, headers=auth).json() == []


def test_oversize_upload_is_413(client, auth, dataset):
    from app.core.config import get_settings

    settings = get_settings()
    limit = settings.max_upload_bytes
    files_before = dataset_files()
    settings.max_upload_bytes = 100
    try:
        response = client.post(DATASETS, params={"name": "big.jsonl"}, content=dataset_lines(dataset, 5), headers=auth)
        assert response.status_code == 413, response.text
        small = b'{"prompt": "a", "response": "b"}\n'
        assert client.post(DATASETS, params={"name": "ok.jsonl"}, content=small, headers=auth).status_code == 201
    finally:
        settings.max_upload_bytes = limit
    assert [d["name"] for d in client.get(DATASETS, headers=auth).json()] == ["ok.jsonl"]
    assert [f for f in dataset_files() if f not in files_before and not f.endswith(".jsonl")] == []
    assert len([f for f in dataset_files() if f not in files_before]) == 1


def test_datasets_list_newest_first(client, auth):
    ids = []
    for i in range(3):
        body = json.dumps({"prompt": f"p{i}", "response": "r"}).encode() + b"\n"
        ids.append(client.post(DATASETS, params={"name": f"d{i}.jsonl"}, content=body, headers=auth).json()["id"])
    assert [d["id"] for d in client.get(DATASETS, headers=auth).json()] == ids[::-1]


# -- 9. events: paging and server-sent events ---------------------------------------------------


def test_events_page_after_an_id(client, auth, dataset):
    from app import job_status

    job = new_job(client, auth, dataset)
    with db() as session:
        job_status.claim(session, job["id"], "w")
    client.post(f"{JOBS}/{job['id']}/cancel", headers=auth)
    with db() as session:
        job_status.finish(session, job["id"], 1, "cancelled")
    events = events_of(client, auth, job["id"])
    assert len(events) == 4
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == 4

    rest = events_of(client, auth, job["id"], after=ids[0])
    assert [e["id"] for e in rest] == ids[1:]
    assert events_of(client, auth, job["id"], after=ids[-1]) == []

    page = client.get(f"{JOBS}/{job['id']}/events", headers=auth, params={"limit": 3}).json()
    assert [e["id"] for e in page["data"]] == ids[:3] and page["has_more"] is True
    page = client.get(f"{JOBS}/{job['id']}/events", headers=auth, params={"limit": 3, "after": ids[2]}).json()
    assert [e["id"] for e in page["data"]] == ids[3:] and page["has_more"] is False
    assert client.get(f"{JOBS}/{job['id']}/events", headers=auth, params={"limit": 0}).status_code == 422


def parse_sse(text: str) -> list[dict]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = {}
        for line in block.split("\n"):
            if line and not line.startswith(":") and ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.removeprefix(" ")
        if "data" in fields:
            events.append(fields)
    return events


@pytest.mark.timeout(30)
def test_event_stream_of_an_ended_job(client, auth, dataset):
    job = new_job(client, auth, dataset)
    assert client.post(f"{JOBS}/{job['id']}/cancel", headers=auth).status_code == 200
    expected = events_of(client, auth, job["id"])

    response = client.get(f"{JOBS}/{job['id']}/events/stream", headers=auth)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert re.search(r"^id: ?\d+$", response.text, re.M)
    assert re.search(r"^event: ?state$", response.text, re.M)
    sent = parse_sse(response.text)
    assert [int(e["id"]) for e in sent] == [e["id"] for e in expected]
    assert [e["event"] for e in sent] == ["state", "state"]
    assert [json.loads(e["data"]) for e in sent] == expected

    resumed = client.get(
        f"{JOBS}/{job['id']}/events/stream", headers={**auth, "Last-Event-ID": str(expected[-1]["id"])}
    )
    assert resumed.status_code == 200
    assert parse_sse(resumed.text) == []

    from_first = client.get(
        f"{JOBS}/{job['id']}/events/stream", headers={**auth, "Last-Event-ID": str(expected[0]["id"])}
    )
    assert [int(e["id"]) for e in parse_sse(from_first.text)] == [expected[1]["id"]]
    by_query = client.get(f"{JOBS}/{job['id']}/events/stream", headers=auth, params={"after": expected[0]["id"]})
    assert [int(e["id"]) for e in parse_sse(by_query.text)] == [expected[1]["id"]]


@pytest.mark.timeout(30)
def test_a_status_change_is_never_visible_without_its_event(client, auth, dataset, monkeypatch):
    """The event stream ends when it sees a terminal status and no new events; that is only safe if
    the status and its `state` event are committed together."""
    from app import crud, job_status
    from app.models import Job

    job = new_job(client, auth, dataset)
    with db() as session:
        attempt = job_status.claim(session, job["id"], "w")
    write_event, seen = crud.stage_event, {}

    def look_from_another_connection(session, job_id, type_, message, level="info", data=None):
        if (data or {}).get("state") == "succeeded":  # the UPDATE ran in this transaction just before
            with db() as other:
                seen["status"] = other.get(Job, job_id).status
        write_event(session, job_id, type_, message, level, data)

    monkeypatch.setattr(crud, "stage_event", look_from_another_connection)
    with db() as session:
        assert job_status.finish(session, job["id"], attempt, "succeeded")
    assert seen["status"] == "running"  # not yet "succeeded" without its event
    stream = client.get(f"{JOBS}/{job['id']}/events/stream", headers=auth).text
    states = [json.loads(e["data"])["data"].get("state") for e in parse_sse(stream)]
    assert states[-1] == "succeeded", states


# -- 10. checkpoints, metrics and evals of a job that has none ----------------------------------


def test_a_new_job_has_no_checkpoints_metrics_or_evals(client, auth, dataset):
    job = new_job(client, auth, dataset)
    base = f"{JOBS}/{job['id']}"
    assert client.get(f"{base}/checkpoints", headers=auth).json() == []
    assert client.get(f"{base}/metrics", headers=auth).json() == {}
    assert client.get(f"{base}/evals", headers=auth).json() == []
    assert client.get(f"{base}/samples", headers=auth).json() == []
    for path in (
        "checkpoints/latest/archive",
        "checkpoints/best/archive",
        "checkpoints/3/archive",
        "checkpoints/best/files/config.json",
        "checkpoints/latest/files/config.json",
    ):
        response = client.get(f"{base}/{path}", headers=auth)
        assert response.status_code == 404, (path, response.text)
        assert "has no checkpoint" in response.json()["message"]


# -- 11. the training process's log -------------------------------------------------------------


def test_a_jobs_log_is_its_owners_per_attempt_with_server_paths_hidden(client, auth, dataset):
    import sys

    from app import job_status
    from app.api.routes.jobs import LOG_BYTES
    from app.core.config import get_settings
    from app.job_paths import job_dir
    from app.models import Job

    job = new_job(client, auth, dataset)
    url = f"{JOBS}/{job['id']}/logs"
    not_started = client.get(url, headers=auth)
    assert not_started.status_code == 404 and "no log yet" in not_started.text
    with db() as session:
        assert job_status.claim(session, job["id"], "w1") == 1
    assert client.get(url, headers=auth).status_code == 404  # started; its process has written nothing yet

    folder = job_dir(get_settings(), job["id"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "attempt-1.log").write_text(f"saving {folder}/checkpoints/step-3\nimported {sys.prefix}/lib/torch\n")
    (folder / "attempt-2.log").write_text("".join(f"line {i}\n" for i in range(LOG_BYTES // 10 + 1000)))  # over the cap
    with db() as session:  # a second attempt, as after a lost worker
        session.execute(update(Job).where(Job.id == job["id"]).values(attempts=2))
        session.commit()

    first = client.get(url, headers=auth, params={"attempt": 1})
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/plain")
    assert first.text == "saving checkpoints/step-3\nimported <python>/lib/torch\n"
    latest = client.get(url, headers=auth)  # the latest attempt's, cut to the cap at a line's start
    lines, last = latest.text.splitlines(), LOG_BYTES // 10 + 999
    assert lines[0].startswith("[the first ") and lines[0].endswith(f"an answer holds its last {LOG_BYTES}]")
    assert lines[1].startswith("line ") and lines[-1] == f"line {last}"
    assert len(latest.content) <= LOG_BYTES + len(lines[0]) + 1
    assert client.get(url, headers=auth, params={"tail": 2}).text == f"line {last - 1}\nline {last}\n"

    missing = client.get(url, headers=auth, params={"attempt": 3})
    assert missing.status_code == 404 and "has had 2" in missing.text
    for bad in ({"attempt": 0}, {"tail": 0}, {"attempt": "x"}):
        assert client.get(url, headers=auth, params=bad).status_code == 422, bad
    other = client.get(
        url, headers=make_user(), params={"attempt": 1}
    )  # anyone else's job is answered as a missing one
    assert other.status_code == 404 and "saving" not in other.text
    with db() as session:
        assert job_status.finish(session, job["id"], 2, "succeeded")

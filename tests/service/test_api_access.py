"""Who may call what: tokens on every route, users' jobs and datasets apart; health, readiness,
Prometheus metrics and docs."""

import re

import pytest
from api_helpers import (
    DATASETS,
    JOBS,
    dataset_lines,
    db,
    detail_for,
    new_job,
    submit,
)
from helpers import make_user, tiny_spec
from sqlalchemy import func, select

pytestmark = pytest.mark.usefixtures("served_test_queues")


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

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
from pydantic import SecretStr
from sqlalchemy import func, select

from app.core.config import get_settings

pytestmark = pytest.mark.usefixtures("served_test_queues")


# -- 1. authentication, health, metrics, docs ---------------------------------------------------

PROTECTED = [
    ("GET", JOBS),
    ("POST", JOBS),
    ("POST", f"{JOBS}/validate"),
    ("GET", f"{JOBS}/job-0000000000000000"),
    ("POST", f"{JOBS}/job-0000000000000000/cancel"),
    ("POST", f"{JOBS}/job-0000000000000000/resume"),
    ("DELETE", f"{JOBS}/job-0000000000000000"),
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
    ("DELETE", f"{DATASETS}/ds-0000000000000000"),
    ("GET", "/api/v1/me/webhook"),
    ("PUT", "/api/v1/me/webhook"),
]


def test_every_api_route_is_covered_by_the_auth_table(client):
    paths = client.get("/openapi.json").json()["paths"]
    api_routes = {(m.upper(), p) for p, ops in paths.items() if p.startswith("/api/v1") for m in ops}
    covered = {
        (m, re.sub(r"ds-0+", "{dataset_id}", re.sub(r"job-0+", "{job_id}", p.split("?")[0]))) for m, p in PROTECTED
    }
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


SCRAPER = "scraper-token"


@pytest.fixture
def scrape(client, monkeypatch):
    """GET /metrics as the operator's scraper, with DISTILL_METRICS_TOKEN set."""
    monkeypatch.setattr(get_settings(), "metrics_token", SecretStr(SCRAPER))
    return lambda: client.get("/metrics", headers={"Authorization": f"Bearer {SCRAPER}"})


def test_prometheus_metrics_count_jobs_and_requests(client, auth, dataset, scrape):
    from app.models import Job

    new_job(client, auth, dataset)
    client.get("/healthz")
    response = scrape()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    with db() as session:
        queued = session.scalar(select(func.count()).select_from(Job).where(Job.status == "queued"))
        cancelled = session.scalar(select(func.count()).select_from(Job).where(Job.status == "cancelled"))
        # Earlier test files in this process may have left jobs queued on other queues (cpu-2).
        on_auto = session.scalar(
            select(func.count()).select_from(Job).where(Job.status == "queued", Job.queue == "auto-1")
        )
    assert queued >= 1
    assert re.search(rf'^distill_jobs\{{status="queued"\}} {queued}\.0$', text, re.M), text
    assert re.search(rf'^distill_jobs\{{status="cancelled"\}} {cancelled}\.0$', text, re.M), text
    for status in ("running", "cancelling", "succeeded", "failed"):
        assert f'distill_jobs{{status="{status}"}}' in text
    assert "# TYPE distill_queue_depth gauge" in text
    assert re.search(rf'^distill_queue_depth\{{queue="auto-1"\}} {on_auto}\.0$', text, re.M), text
    assert "# TYPE distill_http_request_seconds histogram" in text
    assert re.search(
        r'^distill_http_request_seconds_bucket\{le="\+Inf",method="GET",route="/healthz",status="200"\} [1-9]',
        text,
        re.M,
    )
    assert re.search(
        r'^distill_http_request_seconds_count\{method="POST",route="[^"]*/jobs",status="201"\} [1-9]', text, re.M
    )


def test_metrics_are_for_the_operators_scraper_or_this_machine(client, auth, monkeypatch):
    """Every tenant's job counts are not for any client that reaches the API (nor for its users' tokens)."""
    from fastapi.testclient import TestClient

    from app.main import app

    assert client.get("/metrics").status_code == 403  # no token set, and the client is not on this machine
    with TestClient(app, client=("127.0.0.1", 40000)) as local, TestClient(app, client=("::1", 40000)) as local6:
        assert local.get("/metrics").status_code == local6.get("/metrics").status_code == 200
    monkeypatch.setattr(get_settings(), "metrics_token", SecretStr(SCRAPER))
    for headers in ({}, auth, {"Authorization": "Bearer wrong"}):
        assert client.get("/metrics", headers=headers).status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {SCRAPER}"}).status_code == 200


def test_latency_route_label_is_the_full_path_template(client, auth, scrape):
    client.get(JOBS, headers=auth)
    client.get(f"{JOBS}/job-doesnotexist0000", headers=auth)
    text = scrape().text
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


def test_every_response_carries_the_security_headers(client, auth):
    for path in ("/", "/healthz", "/api/v1/jobs", "/static/app.css", "/openapi.json"):
        headers = client.get(path, headers=auth).headers
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY", path
        assert headers["referrer-policy"] == "no-referrer", path
        assert "default-src 'self'" in headers["content-security-policy"], path
    # The interactive docs load Swagger UI from a CDN: only framing is ruled out there.
    assert client.get("/docs").headers["content-security-policy"] == "frame-ancestors 'none'"


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


# -- rate limits --------------------------------------------------------------------------------


def test_failed_sign_ins_are_limited_per_client_address(monkeypatch):
    """Guessing tokens: past failed_sign_in_limit the address gets 429s with a Retry-After, even for a
    right token (a guess that succeeds is no different), while other addresses are served."""
    from fastapi.testclient import TestClient

    from app.main import app

    monkeypatch.setattr(get_settings(), "failed_sign_in_limit", "5/minute")
    auth = make_user()
    with TestClient(app, client=("192.0.2.7", 1)) as guesser, TestClient(app, client=("192.0.2.8", 1)) as other:
        codes = [guesser.get(JOBS, headers={"Authorization": f"Bearer dst_guess{i}"}).status_code for i in range(8)]
        assert codes == [401] * 5 + [429] * 3
        blocked = guesser.get(JOBS, headers=auth)
        assert blocked.status_code == 429 and 1 <= int(blocked.headers["Retry-After"]) <= 60
        assert "failed sign-ins from this address" in blocked.json()["message"]
        assert other.get(JOBS, headers=auth).status_code == 200
        assert guesser.get("/healthz").status_code == 200  # what needs no token is not limited


def test_submits_and_uploads_are_limited_per_user(client, dataset, monkeypatch):
    monkeypatch.setattr(get_settings(), "submit_limit", "3/minute")
    monkeypatch.setattr(get_settings(), "upload_limit", "2/minute")
    user, other = make_user(), make_user()
    answers = [submit(client, user, tiny_spec(dataset)) for _ in range(4)]
    assert [a.status_code for a in answers] == [201, 201, 201, 429]
    assert "job submissions" in answers[-1].json()["message"] and int(answers[-1].headers["Retry-After"]) >= 1
    assert client.post(f"{JOBS}/validate", json=tiny_spec(dataset), headers=user).status_code == 429  # counted too
    assert submit(client, other, tiny_spec(dataset)).status_code == 201  # per user
    line = b'{"prompt": "a", "response": "b"}\n'
    uploads = [client.post(DATASETS, params={"name": "a.jsonl"}, content=line, headers=user) for _ in range(3)]
    assert [u.status_code for u in uploads] == [201, 201, 429]


def test_a_rate_that_cannot_be_read_is_refused_at_start():
    from pydantic import ValidationError

    from app.core.config import Settings

    with pytest.raises(ValidationError, match="submit_limit[\\s\\S]*give a rate such as 20/minute"):
        Settings(submit_limit="lots")

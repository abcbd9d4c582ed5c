"""/openapi.json is good enough to generate clients from: valid OpenAPI 3.1, short operation ids
that change only on purpose, a typed answer for every route, and each route's errors declared in
the one error shape every error is answered in."""

from __future__ import annotations

import re
from pathlib import Path

import schemathesis

from app.schemas import ErrorOut
from distill_client.status import JobStatus
from worker.engine.paths import PROJECT_ROOT

ERROR_MODEL = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
# What generated clients name their methods after. A change here is a change of every client's API:
# make it on purpose (a route's id is its tag and its name, app.main.operation_id).
OPERATION_IDS = {
    "POST /api/v1/jobs": "jobs_create",
    "GET /api/v1/jobs": "jobs_list",
    "POST /api/v1/jobs/validate": "jobs_validate",
    "GET /api/v1/jobs/{job_id}": "jobs_retrieve",
    "POST /api/v1/jobs/{job_id}/cancel": "jobs_cancel",
    "POST /api/v1/jobs/{job_id}/resume": "jobs_resume",
    "DELETE /api/v1/jobs/{job_id}": "jobs_delete",
    "GET /api/v1/jobs/{job_id}/events": "jobs_events",
    "GET /api/v1/jobs/{job_id}/events/stream": "jobs_stream_events",
    "GET /api/v1/jobs/{job_id}/logs": "jobs_logs",
    "GET /api/v1/jobs/{job_id}/metrics": "jobs_metrics",
    "GET /api/v1/jobs/{job_id}/evals": "jobs_evals",
    "GET /api/v1/jobs/{job_id}/samples": "jobs_samples",
    "GET /api/v1/jobs/{job_id}/checkpoints": "jobs_checkpoints",
    "GET /api/v1/jobs/{job_id}/checkpoints/{step}/archive": "jobs_archive",
    "GET /api/v1/jobs/{job_id}/checkpoints/{step}/files/{name}": "jobs_checkpoint_file",
    "POST /api/v1/jobs/{job_id}/checkpoints/{step}/archive/link": "jobs_archive_link",
    "POST /api/v1/jobs/{job_id}/checkpoints/{step}/files/{name}/link": "jobs_file_link",
    "POST /api/v1/datasets": "datasets_upload",
    "GET /api/v1/datasets": "datasets_list",
    "DELETE /api/v1/datasets/{dataset_id}": "datasets_delete",
    "GET /api/v1/me/webhook": "me_webhook",
    "PUT /api/v1/me/webhook": "me_set_webhook",
    "GET /healthz": "health_healthz",
    "GET /readyz": "health_readyz",
}


def operations(document: dict) -> dict[str, dict]:
    return {
        f"{method.upper()} {path}": op for path, methods in document["paths"].items() for method, op in methods.items()
    }


def test_the_description_is_valid_openapi_3_1(client):
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(document).validate()  # against the OpenAPI 3.1 schema


def test_operation_ids_are_pinned(client):
    ids = {route: op.get("operationId") for route, op in operations(client.get("/openapi.json").json()).items()}
    assert ids == OPERATION_IDS


def test_every_route_has_a_typed_answer_and_declares_its_errors(client):
    for route, op in operations(client.get("/openapi.json").json()).items():
        answers = [r for code, r in op["responses"].items() if code.startswith("2")]
        # JSON answers name their model; downloads, logs and event streams their media type, as text or bytes.
        assert any(media.get("schema") for r in answers for media in r.get("content", {}).values()), route
        assert all(media["schema"] != {} for r in answers for media in r.get("content", {}).values()), route
        errors = {code: r for code, r in op["responses"].items() if code.startswith("4")}
        if route.split()[1].startswith("/api/"):
            assert "401" in errors, route  # every API route needs a token
        for code, response in errors.items():
            assert response["content"] == ERROR_MODEL, (route, code)


def test_errors_outside_the_routes_share_the_shape(client):
    """Errors no route raises: an unknown path, a wrong method, a body over the cap (answered before the app)."""
    for response, status in [
        (client.get("/api/v1/nothing-here"), 404),
        (client.delete("/healthz"), 405),
        (client.post("/api/v1/jobs", content=b"x" * (2 << 20)), 413),
    ]:
        assert response.status_code == status
        error = ErrorOut.model_validate(response.json())
        assert error.detail[0].loc == [] and error.detail[0].msg == error.message


def test_a_422_names_each_field_in_its_message(client, auth):
    response = client.get("/api/v1/jobs", params={"limit": 0, "status": "paused"}, headers=auth)
    assert response.status_code == 422
    error = ErrorOut.model_validate(response.json())
    assert [(e.loc, e.type) for e in error.detail] == [
        (["query", "status"], "enum"),
        (["query", "limit"], "greater_than_equal"),
    ]
    assert error.message.startswith("status: Input should be")
    assert error.message.endswith("; limit: Input should be greater than or equal to 1")


def test_the_job_statuses_are_published_once_and_spelled_nowhere_else(client):
    """The API's JobStatus schema lists every status and which end a job; the job's `status`, the
    list filter and the page read it. No module of the service, the engine or the client but
    client/distill_client/status.py spells one (a webhook delivery's own "failed" is another state machine)."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["JobStatus"]["enum"] == [s.value for s in JobStatus]
    assert schemas["JobStatus"]["x-terminal"] == ["succeeded", "failed", "cancelled"]
    assert schemas["JobOut"]["properties"]["status"] == {"$ref": "#/components/schemas/JobStatus"}
    spelled = re.compile(r"[\"'](%s)[\"']" % "|".join(JobStatus))
    own = {Path("client/distill_client/status.py"), Path("app/webhooks.py")}
    offenders = [
        f"{path}:{number}"
        for folder in ("app", "worker", "client/distill_client")
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py"))
        if path.relative_to(PROJECT_ROOT) not in own
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if spelled.search(line)
    ]
    assert not offenders, offenders

"""Every route of /openapi.json fuzzed with schemathesis, in-process against `app.main:app` and the
real PostgreSQL and Redis of this session: no request may be a server error, every status code must
be one the route declares, and the responses the schema describes must match it.

Requests are valid ones (the schema's own values) and invalid ones (each a violation of the schema,
which must be a 4xx). Each runs with a real token and without one. Generated job ids would only
ever be unknown ones, so a case may be sent to a job that exists instead: the fuzzing user's own
(with a checkpoint on disk, so downloads and links are reached) or another user's (a 404, never
their data). The examples are derandomized: CI replays the same requests on every run.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import schemathesis
from helpers import make_user, submit, tiny_spec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import get_client
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import app

# The app's own description, as /openapi.json serves it; loading it over HTTP at import time would
# start the app's lifespan (its reaper thread) before this session's database exists.
schema = schemathesis.openapi.from_dict(app.openapi())
schema.app = app
# Unknown query parameters are ignored, as HTTP APIs do, so they are not generated as violations;
# the token is the test's own (a real one, or none), so schemathesis does not generate one.
schema.config.generation.update(
    modes=["positive", "negative"], allow_extra_parameters=False, with_security_parameters=False
)

# Every route declares the errors it answers (app/api/errors.py), so an undeclared status code is a
# failure. positive_data_acceptance is not checked: a spec that is valid by the schema still names
# models and data that do not exist (a 422 from preflight).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
    response_headers_conformance,
    negative_data_rejection,
    ignored_auth,
]


@schemathesis.serializer("application/x-ndjson")
def _ndjson(_ctx, value) -> bytes:
    """A dataset upload is the file's bytes; a generated value that is not text is sent as its JSON."""
    return value.encode() if isinstance(value, str) else json.dumps(value).encode()


# 25 examples per operation and token keep the run near a minute on 2 cores; DISTILL_FUZZ_EXAMPLES
# raises it for a deeper search by hand.
FUZZ = settings(
    max_examples=int(os.environ.get("DISTILL_FUZZ_EXAMPLES", "25")),
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def world(client, dataset, tmp_path_factory):
    """The fuzzing user's job and another user's, both ended (their event streams close instead of
    waiting) and each with a checkpoint on disk at step 3."""
    auth, other = make_user(), make_user()
    jobs = {}
    for key, owner in (("mine", auth), ("theirs", other)):
        jobs[key] = submit(client, owner, tiny_spec(dataset))
        assert client.post(f"/api/v1/jobs/{jobs[key]}/cancel", headers=owner).status_code == 200
        _checkpoint(jobs[key], tmp_path_factory.mktemp("checkpoint"))
    return {"auth": auth, **jobs}


def _checkpoint(job_id: str, root) -> None:
    from app.core.db import session_factory
    from app.models import Checkpoint

    directory = root / "step-000003"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    archive = root / "step-000003.tar"
    archive.write_bytes(b"tar")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    with session_factory()() as session:
        session.add(
            Checkpoint(
                job_id=job_id,
                step=3,
                path=str(directory),
                archive_path=str(archive),
                archive_size=3,
                archive_sha256=digest(archive),
                scores=None,
                files=[{"name": "config.json", "size": 2, "sha256": digest(directory / "config.json")}],
            )
        )
        session.commit()


@pytest.fixture(scope="module")
def asgi_client():
    """Calls the app in-process without running its lifespan (the session's `client` runs that)."""
    return get_client(app)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """A generated `org/name` teacher is a hub id; the API must not try to reach a hub for each."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# A request that takes longer has hung (an event stream that never ends, say): a failure, not a stall.
TIMEOUT = 30
TARGETS = st.sampled_from(["generated", "mine", "theirs"])


def _aim(case, world, target: str) -> None:
    """Point a job route at an existing job instead of the generated id (valid requests only: an
    invalid path parameter must reach the route as generated)."""
    if target != "generated" and "job_id" in (case.path_parameters or {}) and not _negative_path(case):
        case.path_parameters["job_id"] = world[target]


def _negative_path(case) -> bool:
    from schemathesis.core.parameters import ParameterLocation

    return case.meta is not None and case.meta.is_negative_at(ParameterLocation.PATH)


@schema.parametrize()
@schema.given(target=TARGETS)
@FUZZ
def test_no_server_errors_with_a_token(case, target, world, asgi_client):
    _aim(case, world, target)
    response = case.call_and_validate(session=asgi_client, headers=dict(world["auth"]), checks=CHECKS, timeout=TIMEOUT)
    if target == "theirs" and case.path.startswith("/api/v1/jobs/{job_id}"):
        assert response.status_code in (403, 404, 422), response.text  # 0 reads of another user's job


@schema.parametrize()
@schema.given(target=TARGETS)
@FUZZ
def test_no_server_errors_without_a_token(case, target, world, asgi_client):
    _aim(case, world, target)
    response = case.call_and_validate(session=asgi_client, checks=CHECKS, timeout=TIMEOUT)
    if case.path.startswith("/api/v1") and response.status_code < 400:
        pytest.fail(f"{case.method} {case.formatted_path} answered {response.status_code} without a token")

"""Submitting, listing and cancelling jobs: the spec's checks, idempotency keys, paging."""

import json

import pytest
from api_helpers import (
    DATASETS,
    JOBS,
    dataset_files,
    db,
    detail_for,
    events_of,
    job_count,
    locs,
    new_job,
    submit,
)
from helpers import make_user, tiny_spec

from worker.engine.spec import MAX_STEPS

pytestmark = pytest.mark.usefixtures("served_test_queues")


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
        "max_run_minutes": None,
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
    "steps beyond the cap": (
        lambda d: tiny_spec(d, training={"steps": MAX_STEPS + 1}),
        ["body", "training", "steps"],
        str(MAX_STEPS),
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


def test_the_active_job_limit_holds_under_parallel_submits(client, dataset, monkeypatch):
    """Counted and inserted under the user's row lock: 30 submits at once against a limit of 10 make
    exactly 10 jobs (27 of 30 got past a limit of 20 before)."""
    from concurrent.futures import ThreadPoolExecutor

    from app.core.config import get_settings

    monkeypatch.setattr(get_settings(), "max_active_jobs_per_user", 10)
    user = make_user()
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda i: submit(client, user, tiny_spec(dataset, name=f"p{i}")), range(30)))
    assert sorted(a.status_code for a in answers) == [201] * 10 + [429] * 20, [a.text for a in answers]
    assert job_count(client, user) == 10


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


def test_an_empty_idempotency_key_is_a_422_naming_the_header(client, auth, dataset):
    """An empty key was stored as a key that then made every later empty-key submit retry forever (a 500)."""
    for _ in range(2):
        response = submit(client, auth, tiny_spec(dataset), **{"Idempotency-Key": ""})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["header", "idempotency-key"]
    assert job_count(client, auth) == 0


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


def test_jobs_carry_metadata_and_are_listed_by_it(client, auth, dataset):
    tagged = submit(client, auth, {**tiny_spec(dataset), "metadata": {"commit": "0123abc", "pipeline": "nightly"}})
    assert tagged.status_code == 201, tagged.text
    assert tagged.json()["metadata"] == {"commit": "0123abc", "pipeline": "nightly"}
    assert "metadata" not in tagged.json()["spec"]  # beside the spec, like notify: the engine never sees it
    other = new_job(client, auth, dataset, name="untagged")
    assert other["metadata"] == {}

    def listed(*pairs: str) -> list[str]:
        response = client.get(JOBS, headers=auth, params={"metadata": list(pairs)})
        assert response.status_code == 200, response.text
        return [j["id"] for j in response.json()["data"]]

    assert listed("commit:0123abc") == [tagged.json()["id"]]
    assert listed("commit:0123abc", "pipeline:nightly") == [tagged.json()["id"]]
    assert listed("commit:0123abc", "pipeline:weekly") == []
    assert listed() == [other["id"], tagged.json()["id"]]
    bad = client.get(JOBS, headers=auth, params={"metadata": "no-colon"})
    assert bad.status_code == 422 and locs(bad) == [["query", "metadata"]]
    refused = submit(client, auth, {**tiny_spec(dataset), "metadata": {"a b": "x"}})
    assert refused.status_code == 422 and locs(refused)[0][:2] == ["body", "metadata"]

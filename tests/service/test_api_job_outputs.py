"""What a job produced: its events (paged and streamed), metrics, evals, checkpoints and log."""

import json
import re

import pytest
from api_helpers import (
    JOBS,
    db,
    events_of,
    new_job,
)
from helpers import make_user
from sqlalchemy import update

pytestmark = pytest.mark.usefixtures("served_test_queues")


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

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import read_events, tiny_spec, wait_for

from app.cli import EXIT_CODES
from app.core.config import Settings
from distill_client.api import Client
from worker.engine.launch import free_port
from worker.engine.paths import PROJECT_ROOT


def test_users_create_prints_a_token_that_signs_in(client):
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "users", "create", "carol"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("dst_")
    assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {token}x"}).status_code == 401


def test_readme_documents_every_setting():
    readme = (PROJECT_ROOT / "README.md").read_text()
    missing = [f"DISTILL_{name.upper()}" for name in Settings.model_fields if f"`DISTILL_{name.upper()}`" not in readme]
    assert not missing, f"README's settings table lacks {missing}"


def _distill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, env=os.environ.copy(), timeout=120
    )


def test_tokens_are_listed_revoked_and_expire(client):
    from datetime import timedelta

    from sqlalchemy import select

    from app import crud
    from app.core.db import session_factory
    from app.models import User

    first = _distill("users", "create", "dave", "--expires-days", "30").stdout.strip().splitlines()[-1]
    second = _distill("users", "token", "dave").stdout.strip().splitlines()[-1]
    signs_in = lambda token: client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code  # noqa: E731
    assert signs_in(first) == signs_in(second) == 200
    listing = _distill("users", "tokens", "dave").stdout.strip().splitlines()
    assert len(listing) == 3 and first not in "\n".join(listing)  # a header and two rows; no secret shown
    first_id = int(listing[1].split()[0])
    assert listing[1].split()[3] != "-" and listing[2].split()[3] == "-"  # an expiry on the first only

    revoked = _distill("users", "revoke", str(first_id))
    assert revoked.returncode == 0, revoked.stderr
    assert signs_in(first) == 401 and signs_in(second) == 200  # the other token keeps working
    assert _distill("users", "revoke", str(first_id)).returncode != 0  # already revoked
    assert _distill("users", "tokens", "nobody").returncode != 0

    with session_factory()() as session:  # a token past its expiry, by the database's clock
        user = session.scalar(select(User).where(User.name == "dave"))
        expired = crud.create_token(session, user, timedelta(seconds=-1))
    assert signs_in(expired) == 401


# -- for CI: exit codes, --json, validate, --set ---------------------------------------------------


def _api(server: str, auth: dict, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`distill ARGS` against the test server, as a CI step runs it."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args, "--url", server, "--token", auth["Authorization"][7:]],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )


def _error(result: subprocess.CompletedProcess) -> dict:
    """The JSON error a --json command printed on stderr; no traceback, no token."""
    assert "Traceback" not in result.stderr and "dst_" not in result.stderr, result.stderr
    error = json.loads(result.stderr.strip().splitlines()[-1])
    assert error["exit_code"] == result.returncode
    return error


def _spec_file(path, spec: dict):
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_readme_and_help_list_every_exit_code():
    readme = (PROJECT_ROOT / "README.md").read_text()
    documented = dict(re.findall(r"^\| `(\d)` \| (.+) \|$", readme, re.MULTILINE))
    assert sorted(int(code) for code in documented) == sorted(EXIT_CODES)
    shown = _distill("--help").stdout
    assert all(f"{int(code)}  " in shown for code in EXIT_CODES) and "Exit codes" in shown


def test_users_create_refuses_a_name_that_exists(client):
    assert _distill("users", "create", "erin").returncode == 0
    again = _distill("users", "create", "erin")
    assert again.returncode == 2 and again.stderr.strip() == (
        "error: a user named 'erin' exists; `distill users token erin` gives them another token"
    )
    assert _error(_distill("users", "create", "erin", "--json"))["exit_code"] == 2
    assert _distill("users", "token", "nobody").returncode == 4
    created = json.loads(_distill("users", "token", "erin", "--json").stdout)
    assert created["name"] == "erin" and created["token"].startswith("dst_")


def test_errors_are_one_line_with_an_exit_code_of_their_kind(server, auth, dataset, tmp_path):
    missing = _api(server, auth, "status", "job-0000000000000000", "--json")
    assert missing.returncode == 4 and _error(missing)["status_code"] == 404
    assert _error(missing)["detail"] == [{"loc": [], "msg": "no job job-0000000000000000", "type": "not_found"}]
    assert (
        _api(server, auth, "status", "job-0000000000000000").stderr == "error: HTTP 404: no job job-0000000000000000\n"
    )
    assert _api(server, auth, "download", "job-0000000000000000", "-o", str(tmp_path / "dl")).returncode == 4

    wrong_token = _api(server, {"Authorization": "Bearer dst_wrong"}, "jobs", "--json")
    assert wrong_token.returncode == 6 and _error(wrong_token)["status_code"] == 401

    nobody = f"http://127.0.0.1:{free_port()}"
    unreachable = _api(nobody, auth, "jobs", "--json", DISTILL_RETRY_SECONDS="0")
    assert unreachable.returncode == 5 and _error(unreachable)["error"].startswith(f"cannot reach {nobody}/api/v1/jobs")

    bad = _spec_file(tmp_path / "bad.yaml", tiny_spec(dataset, training={"steps": "many"}))
    refused = _api(server, auth, "submit", bad, "--json")
    assert refused.returncode == 2 and ["body", "training", "steps"] in [d["loc"] for d in _error(refused)["detail"]]
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    assert _api(server, auth, "submit", str(tmp_path / "broken.yaml")).returncode == 2
    assert _error(_api(server, auth, "submit", bad, "--set", "training", "--json"))["error"].startswith(
        "override 'training'"
    )
    usage = _api(server, auth, "submit", str(tmp_path / "absent.yaml"), "--json")  # the command line itself
    assert usage.returncode == 2 and "absent.yaml" in _error(usage)["error"]
    assert _api(server, auth, "jobs", "--json").stdout.strip() == "[]"  # none of that queued anything


def test_validate_checks_like_submit_and_queues_nothing(server, auth, dataset, tmp_path):
    spec = _spec_file(tmp_path / "spec.yaml", tiny_spec(dataset))
    valid = _api(server, auth, "validate", spec, "--json", "--set", "training.steps=9")
    assert valid.returncode == 0, valid.stderr
    checked = json.loads(valid.stdout)
    assert checked["training"]["steps"] == 9 and "resources" in checked  # normalised: defaults filled in
    assert checked["data"]["train"].startswith("dataset:")  # the local file, uploaded as submit does
    assert _api(server, auth, "validate", spec).stdout.strip() == f"{spec}: valid"

    outside = _api(server, auth, "validate", spec, "--set", "teacher=/etc", "--json")  # outside the model roots
    assert outside.returncode == 2 and [d["loc"] for d in _error(outside)["detail"]] == [["body", "teacher"]]
    assert _api(server, auth, "validate", spec, "--set", "training.batch_size=0").returncode == 2
    assert json.loads(_api(server, auth, "jobs", "--json").stdout) == []

    # validate's upload is used again by submit, which also takes the overrides
    submitted = _api(
        server,
        auth,
        "submit",
        spec,
        "--set",
        "training.steps=12",
        "--set",
        "name=from-ci",
        "--set",
        "eval.every_steps=0",
        "--json",
    )
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert (job["name"], job["spec"]["training"]["steps"], job["spec"]["eval"]["every_steps"]) == ("from-ci", 12, 0)
    assert job["spec"]["data"]["train"] == checked["data"]["train"]
    assert len(json.loads(_api(server, auth, "datasets", "--json").stdout)) == 2  # train and eval, once each

    listed = json.loads(_api(server, auth, "jobs", "--limit", "1", "--json").stdout)
    assert [j["id"] for j in listed] == [job["id"]] and listed[0]["status"] == "queued"
    refused = _api(server, auth, "delete", job["id"], "--json")  # queued: cancel it first
    assert refused.returncode == 2 and _error(refused)["status_code"] == 409
    for _ in range(2):  # a repeated cancel does no harm
        cancelled = _api(server, auth, "cancel", job["id"], "--json")
        assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"
    resumed = _api(server, auth, "resume", job["id"], "--json")  # cancelled: it can go on
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["status"] == "queued", resumed.stderr
    assert _api(server, auth, "cancel", job["id"]).returncode == 0
    assert _api(server, auth, "delete", job["id"]).stdout.strip() == f"deleted {job['id']}"
    assert json.loads(_api(server, auth, "jobs", "--json").stdout) == []

    # A local Parquet file (written by `datasets`) is uploaded as it is; the spec maps its columns.
    from datasets import Dataset

    Dataset.from_dict({"question": ["2+2?", "Hi?"], "answer": ["4", "Hello."]}).to_parquet(str(tmp_path / "qa.parquet"))
    columns = {"question": "instruction", "answer": "output"}
    table = _spec_file(tmp_path / "table.yaml", tiny_spec(dataset, data={"train": "qa.parquet", "columns": columns}))
    valid = _api(server, auth, "validate", table, "--json")
    assert valid.returncode == 0, valid.stderr
    assert json.loads(valid.stdout)["data"]["train"].startswith("dataset:")
    assert "qa.parquet" in [d["name"] for d in json.loads(_api(server, auth, "datasets", "--json").stdout)]
    for uploaded in json.loads(_api(server, auth, "datasets", "--json").stdout):
        assert _api(server, auth, "delete-dataset", uploaded["id"]).returncode == 0
    assert json.loads(_api(server, auth, "datasets", "--json").stdout) == []


def test_wait_with_a_timeout_gives_up_with_exit_code_7_and_the_job_runs_on_and_jobs_are_found_by_metadata(
    server, client, auth, dataset, tmp_path
):
    spec = _spec_file(tmp_path / "spec.yaml", tiny_spec(dataset))
    waited = _api(server, auth, "submit", spec, "--wait", "--timeout", "1", "--json")  # no worker here: queued
    assert waited.returncode == 7, waited.stderr
    job = json.loads(waited.stdout)
    assert job["status"] == "queued" and "still queued after 1 s (--timeout); it runs on" in waited.stderr
    listed = _api(server, auth, "jobs").stdout.splitlines()  # a table with its header
    assert listed[0].split() == ["id", "status", "step/total", "name"] and listed[1].startswith(job["id"])
    client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth)

    # Metadata from CI: a commit SHA of digits stays text; jobs are found by it, a page at a time.
    tagged = json.loads(_api(server, auth, "submit", spec, "--meta", "commit=0123", "--json").stdout)
    assert tagged["metadata"] == {"commit": "0123"}
    found = _api(server, auth, "jobs", "--meta", "commit=0123", "--json")
    assert [j["id"] for j in json.loads(found.stdout)] == [tagged["id"]]
    first = _api(server, auth, "jobs", "--limit", "1")
    assert f"more: distill jobs --after {tagged['id']}" in first.stderr
    rest = json.loads(_api(server, auth, "jobs", "--after", tagged["id"], "--json").stdout)
    assert [j["id"] for j in rest] == [job["id"]]
    assert _api(server, auth, "jobs", "--meta", "commit").returncode == 2
    client.post(f"/api/v1/jobs/{tagged['id']}/cancel", headers=auth)


def test_version_completion_and_no_waiting_for_a_server_that_is_not_there():
    from importlib.metadata import version

    assert _distill("--version").stdout.strip() == f"distill {version('distill')}"
    script = str(Path(sys.executable).with_name("distill"))  # the installed command, as a shell completes it
    shown = subprocess.run([script, "--show-completion", "bash"], capture_output=True, text=True).stdout
    assert "complete -o default -F _distill_completion distill" in shown, shown
    # No DISTILL_URL: this machine's server, which is not running; an error at once, not 300 s of retries.
    env = {k: v for k, v in os.environ.items() if k not in ("DISTILL_URL", "DISTILL_RETRY_SECONDS")}
    env.update(DISTILL_PORT=str(free_port()))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "app.cli", "jobs"], capture_output=True, text=True, env=env)
    assert result.returncode == 5 and "`distill up` starts one" in result.stderr, result.stderr
    assert time.monotonic() - started < 30
    env.update(DISTILL_PORT="eighty")  # a bad setting: one line naming it, not a traceback
    result = subprocess.run([sys.executable, "-m", "app.cli", "jobs"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and result.stderr.startswith("error: bad setting: DISTILL_PORT:"), result.stderr


def test_submit_wait_exits_3_when_the_job_is_cancelled(server, client, auth, dataset, tmp_path):
    spec = _spec_file(tmp_path / "spec.yaml", tiny_spec(dataset))
    args = [
        sys.executable,
        "-m",
        "app.cli",
        "submit",
        spec,
        "--wait",
        "--json",
        "--url",
        server,
        "--token",
        auth["Authorization"][7:],
    ]
    waiting = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        jobs = wait_for(lambda: client.get("/api/v1/jobs", headers=auth).json()["data"], timeout=60, what="the job")
        client.post(f"/api/v1/jobs/{jobs[0]['id']}/cancel", headers=auth)  # queued (no worker here): at once
        out, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 3, err
    assert json.loads(out)["status"] == "cancelled"
    assert f"submitted {jobs[0]['id']}" in err  # lines for people go to stderr with --json


def test_logs_raw_prints_what_the_training_process_printed(server, client, auth, dataset):
    from app import job_status
    from app.core.config import get_settings
    from app.core.db import session_factory
    from app.job_paths import job_dir

    job = client.post("/api/v1/jobs", headers=auth, json=tiny_spec(dataset)).json()
    assert _api(server, auth, "logs", job["id"], "--raw").returncode == 4  # not started: no log yet
    with session_factory()() as session:
        assert job_status.claim(session, job["id"], "w1") == 1
    folder = job_dir(get_settings(), job["id"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "attempt-1.log").write_text(f"step 1\nsaved {folder}/checkpoints/step-1\n")
    printed = _api(server, auth, "logs", job["id"], "--raw")
    assert printed.returncode == 0 and printed.stdout == "step 1\nsaved checkpoints/step-1\n"
    assert _api(server, auth, "logs", job["id"], "--raw", "--tail", "1").stdout == "saved checkpoints/step-1\n"
    assert json.loads(_api(server, auth, "logs", job["id"], "--raw", "--json").stdout) == {"log": printed.stdout}
    assert _api(server, auth, "logs", job["id"], "--raw", "--attempt", "2").returncode == 4
    assert _api(server, auth, "logs", job["id"], "--raw", "-f").returncode == 2
    # Ended by its owner, whatever happened meanwhile: no worker beats for attempt 1, so on a slow machine
    # the reaper may have queued it again while the commands above ran.
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth).status_code == 200


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_jobs")
def test_submit_wait_exits_0_for_a_succeeded_job_and_1_for_a_failed_one(server, auth, dataset, worker, tmp_path):
    spec = _spec_file(tmp_path / "spec.yaml", tiny_spec(dataset))
    done = _api(server, auth, "submit", spec, "--wait", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    job = json.loads(done.stdout)
    assert job["status"] == "succeeded" and job["progress"]["step"] == 6

    listed = json.loads(_api(server, auth, "checkpoints", job["id"], "--json").stdout)
    assert [c["step"] for c in listed] == [3, 6] and sum(c["best"] for c in listed) == 1
    assert {"teacher", "initial", "final", "best"} <= {
        e["label"] for e in json.loads(_api(server, auth, "evals", job["id"], "--json").stdout)
    }
    assert "state" in {e["type"] for e in json.loads(_api(server, auth, "logs", job["id"], "--json").stdout)}
    with Client(server, auth["Authorization"].removeprefix("Bearer ")) as client:  # the same, from Python
        kept = {k.label: k.samples for k in client.jobs.samples(job["id"])}
    assert {"teacher", "initial", "final"} <= kept.keys() and all(s.response is not None for s in kept["final"])
    fetched = _api(server, auth, "download", job["id"], "--step", "best", "-o", str(tmp_path / "models"), "--json")
    assert fetched.returncode == 0, fetched.stderr
    assert (PROJECT_ROOT / json.loads(fetched.stdout)["path"] / "config.json").is_file()

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "not a number"}')
    failed = _api(server, auth, "submit", spec, "--set", f"teacher={broken}", "--wait", "--json")
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert json.loads(failed.stdout)["status"] == "failed" and json.loads(failed.stdout)["error"]["code"]
    assert len(json.loads(_api(server, auth, "datasets", "--json").stdout)) == 2  # the data files, uploaded once


@pytest.mark.slow
def test_train_takes_overrides_and_prints_json_for_a_gkd_job(tmp_path):
    out = tmp_path / "run"
    result = _distill(
        "train",
        str(PROJECT_ROOT / "examples" / "tiny.yaml"),
        "-o",
        str(out),
        "--set",
        "method=gkd",
        "--set",
        "data.pretrain=null",  # MiniLLM's LM term; another method refuses it
        "--set",
        "training.steps=3",
        "--set",
        "gkd.lmbda=0.6",
        "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["output"] == str(out) and "final" in summary["scores"]
    ran = json.loads((out / "spec.json").read_text())
    assert (ran["method"], ran["training"]["steps"], ran["gkd"]["lmbda"]) == ("gkd", 3, 0.6)
    events = read_events(out)
    assert any(e["type"] == "log" and e["message"].startswith("gkd: generalised JSD (beta 0.5)") for e in events)
    # The micro-batches' draws at seed 10 are 0.67, 0.69 and 0.51: the third samples its own responses.
    metrics = [e["data"]["values"] for e in events if e["type"] == "metrics"]
    assert [m["on_policy"] for m in metrics] == [0, 0, 1]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    assert "arxiv:2306.13649" in (out / "checkpoints" / "step-000003" / "README.md").read_text()

"""The client (client/, the distill-client package) against the real API: installed alone on another
Python, what it writes, paging, and its retries through a real HTTP proxy that fails the first requests."""

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from helpers import tiny_spec

from distill_client.api import ApiError, Client
from worker.engine.launch import free_port
from worker.engine.paths import PROJECT_ROOT

# Runs in the client's own virtualenv, of another Python than the server's, where nothing of the server is
# installed: the client and a round of calls.
_CLIENT_ALONE = """
import json, os, sys
from distill_client import Client

spec = json.loads(os.environ["SPEC"])
with Client() as client:  # DISTILL_URL and DISTILL_TOKEN
    checked = client.jobs.validate(spec)
    job = client.jobs.create(spec)
    listed = [j.id for j in client.jobs.list(page_size=1)]
    events = [e.type for e in client.jobs.events(job.id)]
    ended = client.jobs.wait(client.jobs.cancel(job.id).id)
    print(json.dumps({"checked": checked, "job": job.id, "listed": listed, "events": events, "ended": ended.status,
                      "datasets": len(client.datasets.list()), "checkpoints": client.checkpoints.list(job.id),
                      "python": sys.version_info[:2]}))
"""


@pytest.fixture(scope="module")
def client_venv() -> Path:
    """The bin folder of the client's virtualenv (scripts/ensure-client-venv.sh)."""
    made = subprocess.run([PROJECT_ROOT / "scripts/ensure-client-venv.sh"], capture_output=True, text=True, check=True)
    if not made.stdout.strip():
        pytest.skip("no Python but the server's on this machine (pyenv's 3.9 to 3.13 are looked for)")
    return Path(made.stdout.strip())


def token_of(auth: dict) -> str:
    return auth["Authorization"].removeprefix("Bearer ")


def test_the_client_installs_alone_on_another_python_and_its_api_and_command_line_work(
    server, auth, dataset, tmp_path, client_venv
):
    """The client built from client/ into a virtualenv of its own (Python 3.9 where pyenv has it), with
    none of the server's packages: the Python API does a round of calls, `distill` lists jobs and says
    its version, and nothing is written where it runs."""
    here = tmp_path / "ci-step"
    here.mkdir()
    env = {
        "PATH": f"{client_venv}:/usr/bin:/bin",
        "DISTILL_URL": server,
        "DISTILL_TOKEN": token_of(auth),
        "SPEC": json.dumps(tiny_spec(dataset)),
        "HOME": str(here),
    }
    installed = subprocess.run(
        [client_venv / "python", "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    )
    assert {"torch", "fastapi", "sqlalchemy", "distill"}.isdisjoint(p["name"] for p in json.loads(installed.stdout))
    result = subprocess.run(
        [client_venv / "python", "-c", _CLIENT_ALONE], cwd=here, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[0])
    assert seen["python"] != list(sys.version_info[:2])
    assert seen["listed"] == [seen["job"]] and seen["ended"] == "cancelled"
    assert seen["checked"]["training"]["steps"] == 6 and "resources" in seen["checked"]  # defaults filled in
    assert "state" in seen["events"] and seen["checkpoints"] == [] and seen["datasets"] == 0

    # The command line: a CI step runs `distill`, not Python.
    listed = subprocess.run(["distill", "jobs", "--json"], cwd=here, env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert [j["id"] for j in json.loads(listed.stdout)] == [seen["job"]]
    version = subprocess.run(["distill", "--version"], env=env, capture_output=True, text=True)
    assert version.stdout.strip() == "distill 0.1.0"
    # No address: a usage error at once, not a wait for a server on localhost.
    del env["DISTILL_URL"]
    began = time.monotonic()
    nowhere = subprocess.run(["distill", "jobs"], cwd=here, env=env, capture_output=True, text=True)
    assert nowhere.returncode == 2 and "no API address: give --url or set DISTILL_URL" in nowhere.stderr
    assert time.monotonic() - began < 30
    assert list(here.iterdir()) == []


def test_jobs_are_listed_across_pages_newest_first(server, auth, dataset):
    with Client(server, token_of(auth)) as client:
        made = [client.jobs.create(tiny_spec(dataset, name=f"paged-{n}")).id for n in range(3)]
        try:
            assert [j.id for j in client.jobs.list(page_size=2)] == made[::-1]
            assert [j.id for j in client.jobs.list(status="succeeded")] == []
        finally:
            for job_id in made:
                client.jobs.cancel(job_id)
        assert {j.status for j in client.jobs.list()} == {"cancelled"}
        assert client.jobs.cancel(made[0]).status == "cancelled"  # an ended job, as it is: a repeat does no harm


class FlakyProxy:
    """A real HTTP server in front of the API. The first `refuse` requests get a 503 and never reach
    the API; the next `lose` reach it, but their answer is replaced by a 502 (what a proxy answers
    when the API's answer is lost on the way); the rest are passed through."""

    def __init__(self, upstream: str, refuse: int = 0, lose: int = 0, port: int = 0):
        self.upstream, self.refuse, self.lose, self.port = upstream, refuse, lose, port
        self.seen: list[tuple[str, str, int]] = []  # method, path, the status the client got
        self.lock = threading.Lock()
        self.httpd = None

    def start(self) -> "FlakyProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy.lock:
                    refused = proxy.refuse > 0
                    proxy.refuse -= refused
                if refused:
                    return self.answer(503, b"<html>\n<h1>503</h1> the service is restarting\n</html>", "text/html")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                upstream = httpx.request(
                    self.command, proxy.upstream + self.path, headers=headers, content=body, timeout=60
                )
                with proxy.lock:
                    lost = proxy.lose > 0
                    proxy.lose -= lost
                if lost:
                    return self.answer(502, b"bad gateway", "text/plain")
                self.answer(upstream.status_code, upstream.content, upstream.headers.get("content-type", "text/plain"))

            def answer(self, status: int, body: bytes, content_type: str) -> None:
                proxy.seen.append((self.command, self.path.partition("?")[0], status))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = relay

            def log_message(self, *_args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True, name="flaky-proxy").start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_requests_are_retried_through_a_server_that_fails_first(server, auth, dataset):
    proxy = FlakyProxy(server, refuse=2).start()
    try:
        with Client(proxy.url, token_of(auth), retry_seconds=60) as client:
            assert list(client.jobs.list()) == []
            assert [s for _, _, s in proxy.seen] == [503, 503, 200]

            # The API creates the job but its answer is lost: the retry, with the same Idempotency-Key
            # the client chose, gets that job instead of making a second one.
            proxy.lose, proxy.seen[:] = 1, []
            job = client.jobs.create(tiny_spec(dataset))
            assert [(m, s) for m, _, s in proxy.seen] == [("POST", 502), ("POST", 201)]
            assert [j.id for j in client.jobs.list()] == [job.id]

            # An error the API itself answers is not retried.
            proxy.seen[:] = []
            with pytest.raises(ApiError) as missing:
                client.jobs.retrieve("job-0000000000000000")
            assert missing.value.status_code == 404 and len(proxy.seen) == 1
            assert (
                missing.value.message == "no job job-0000000000000000"
                and missing.value.detail[0]["type"] == "not_found"
            )
            client.jobs.cancel(job.id)
    finally:
        proxy.stop()


def test_a_server_that_is_not_up_yet_is_waited_for(server, auth):
    later = FlakyProxy(server, port=free_port())
    starter = threading.Timer(2.0, later.start)
    starter.start()
    try:
        began = time.monotonic()
        with Client(later.url, token_of(auth), retry_seconds=60) as client:
            assert list(client.jobs.list()) == []  # connection refused at first
        assert time.monotonic() - began >= 2.0
    finally:
        starter.join()
        later.stop()
    with Client(later.url, token_of(auth), retry_seconds=0) as client, pytest.raises(httpx.ConnectError):
        list(client.jobs.list())  # given up: the CLI turns this into exit code 5


def test_the_client_is_a_package_of_its_own_with_ranges_and_the_server_pins_it():
    import tomllib

    client = tomllib.loads((PROJECT_ROOT / "client/pyproject.toml").read_text())["project"]
    assert client["name"] == "distill-client" and client["requires-python"] == ">=3.9"
    assert {re.split(r"[<>=]", d)[0] for d in client["dependencies"]} == {
        "httpx",
        "pydantic",
        "pyyaml",
        "tenacity",
        "typer",
        "tqdm",
    }
    assert not any("==" in d for d in client["dependencies"]), client["dependencies"]  # installs beside others
    assert client["scripts"] == {"distill": "distill_client.cli:main"}

    server = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    assert f"distill-client=={client['version']}" in server["dependencies"]
    assert "scripts" not in server  # one `distill`: the client's, which the server's commands plug into
    assert server["entry-points"]["distill.cli"] == {"server": "app.cli"}
    extras = {pin.split("==")[0].split("[")[0].lower() for pin in server["optional-dependencies"]["server"]}
    assert {"torch", "transformers", "fastapi", "sqlalchemy", "celery"} <= extras
    for name in ("Makefile", "Dockerfile"):
        assert "-e ./client -e '.[server" in (PROJECT_ROOT / name).read_text(), name

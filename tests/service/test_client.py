"""The Python client (app/client.py) against the real API: what it imports, what it writes, paging,
and its retries through a real HTTP proxy that fails the first requests."""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from helpers import tiny_spec

from app.client import ApiError, Client
from worker.engine.launch import free_port
from worker.engine.paths import PROJECT_ROOT

# Runs in a fresh interpreter: the client and a round of calls, with the server's packages unimportable.
_CLIENT_ALONE = """
import importlib.abc, json, os, sys

# What the `server` extra brings (pyproject.toml): none of it is installed on a client-only machine.
SERVER_PACKAGES = {"torch", "transformers", "deepspeed", "numpy", "safetensors", "huggingface_hub", "sqlalchemy",
                   "alembic", "psycopg", "celery", "kombu", "redis", "fastapi", "starlette", "uvicorn", "boto3"}


class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in SERVER_PACKAGES:
            raise ImportError(f"the client imported {name}")


sys.meta_path.insert(0, Guard())
from app.client import Client

spec = json.loads(os.environ["SPEC"])
with Client() as client:  # DISTILL_URL and DISTILL_TOKEN
    checked = client.jobs.validate(spec)
    job = client.jobs.create(spec)
    listed = [j.id for j in client.jobs.list(page_size=1)]
    events = [e.type for e in client.jobs.events(job.id)]
    ended = client.jobs.wait(client.jobs.cancel(job.id).id)
    print(json.dumps({"checked": checked, "job": job.id, "listed": listed, "events": events, "ended": ended.status,
                      "datasets": len(client.datasets.list()), "checkpoints": client.checkpoints.list(job.id),
                      "loaded": sorted(SERVER_PACKAGES & {m.partition(".")[0] for m in sys.modules})}))
# The command line too: a CI step runs `distill`, not Python.
from app.cli import main

sys.argv = ["distill", "jobs", "--json"]
try:
    main()
except SystemExit as exit:
    assert not exit.code, exit.code
"""


def token_of(auth: dict) -> str:
    return auth["Authorization"].removeprefix("Bearer ")


def test_the_client_needs_none_of_the_servers_packages_and_writes_nothing_here(server, auth, dataset, tmp_path):
    here = tmp_path / "ci-step"
    here.mkdir()
    env = {
        **os.environ,
        "DISTILL_URL": server,
        "DISTILL_TOKEN": token_of(auth),
        "SPEC": json.dumps(tiny_spec(dataset)),
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-c", _CLIENT_ALONE], cwd=here, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[0])
    assert seen["loaded"] == [] and seen["listed"] == [seen["job"]] and seen["ended"] == "cancelled"
    assert (
        seen["checked"]["training"]["steps"] == 6 and "resources" in seen["checked"]
    )  # normalised: defaults filled in
    assert "state" in seen["events"] and seen["checkpoints"] == [] and seen["datasets"] == 0
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


def test_the_package_alone_is_the_light_client_and_the_service_is_an_extra():
    import tomllib

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    names = {pin.split("==")[0].split("[")[0].lower() for pin in project["dependencies"]}
    assert names == {"httpx", "pydantic", "pydantic-settings", "tenacity", "pyyaml", "typer", "tqdm"}
    server = {pin.split("==")[0].split("[")[0].lower() for pin in project["optional-dependencies"]["server"]}
    assert {"torch", "transformers", "fastapi", "sqlalchemy", "celery"} <= server
    assert (
        ".[server" in (PROJECT_ROOT / "Makefile").read_text()
        and ".[server]" in (PROJECT_ROOT / "Dockerfile").read_text()
    )

"""Job-end webhooks against a real HTTP receiver on this machine: one signed message per finished job
(succeeded and failed by a real worker, cancelled, lost), through a receiver that fails, one that
is down for a while, and several reapers sending at once."""

import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import pytest
import trustme
from helpers import make_user, submit, tiny_spec, wait_for, wait_status
from huggingface_hub import ModelCard
from sqlalchemy import select, update

from app import job_status, webhooks
from app.core.config import get_settings
from app.core.db import session_factory
from app.models import Job, User, WebhookDelivery
from worker.engine.checkpoints import METRIC_NAMES
from worker.engine.launch import free_port
from worker.engine.paths import PROJECT_ROOT

pytestmark = pytest.mark.usefixtures("no_leftover_jobs")


def readme_verify():
    """The signature check README.md gives receivers, run as it is written there."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "def verify(" in block)
    scope: dict = {}
    exec(code, scope)
    return scope["verify"]


class Receiver:
    """An HTTP server in a thread that records every request; the first `fail_first` answer 500."""

    def __init__(
        self, port: int | None = None, fail_first: int = 0, delay: float = 0.0, tls: ssl.SSLContext | None = None
    ):
        """`tls`: serve https with this server context (its certificate), on `https_url(host)`."""
        self.port, self.fail_first, self.delay, self.tls = port or free_port(), fail_first, delay, tls
        self.requests: list[dict] = []  # {path, headers, body, status}
        self.lock, self.server = threading.Lock(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/distill"

    def https_url(self, host: str) -> str:
        return f"https://{host}:{self.port}/hooks/distill"

    def accepted(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["status"] == 200]

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(receiver.delay)
                with receiver.lock:
                    status = 500 if len(receiver.requests) < receiver.fail_first else 200
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body, "status": status}
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.tls:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


def user_with_webhook(url: str | None) -> tuple[dict, str]:
    """A new user whose default webhook is `url`; their API headers and signing secret."""
    name = f"hooked-{os.urandom(3).hex()}"
    auth = make_user(name)
    with session_factory()() as session:
        user = session.scalar(select(User).where(User.name == name))
        secret = webhooks.set_user_webhook(session, user, url, get_settings())
    return auth, secret


def end_job(client, auth, dataset, status: str = "succeeded", **spec) -> str:
    """A job submitted through the API and ended through the status machine, as a worker ends it."""
    job_id = submit(client, auth, tiny_spec(dataset, **spec))
    with session_factory()() as session:
        attempt = job_status.claim(session, job_id, "test-worker")
        assert job_status.finish(
            session, job_id, attempt, status, {"code": "Boom", "message": "it broke"} if status == "failed" else None
        )
    return job_id


def delivery(job_id: str) -> WebhookDelivery:
    with session_factory()() as session:
        return session.scalar(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id))


def messages_for(receiver: Receiver, job_id: str) -> list[dict]:
    return [json.loads(r["body"]) for r in receiver.accepted() if json.loads(r["body"])["job"]["id"] == job_id]


def one_message(receiver: Receiver, job_id: str, secret: str, settle: bool = True) -> dict:
    """The receiver's one accepted message for the job, its signature checked; a few reaper rounds
    later (unless `settle` is off: the caller waited) it is still the only one."""
    wait_for(lambda: messages_for(receiver, job_id), timeout=60, interval=0.2, what=f"a webhook for {job_id}")
    if settle:
        time.sleep(3 * get_settings().heartbeat_seconds)  # every reaper has had rounds to send it again
    sent = [r for r in receiver.accepted() if json.loads(r["body"])["job"]["id"] == job_id]
    assert len(sent) == 1, sent
    request = sent[0]
    verify = readme_verify()
    assert verify(secret, request["headers"]["X-Distill-Signature"], request["body"])
    assert not verify(secret + "x", request["headers"]["X-Distill-Signature"], request["body"])
    assert not verify(secret, request["headers"]["X-Distill-Signature"], request["body"] + b" ")
    message = json.loads(request["body"])
    assert (
        request["headers"]["X-Distill-Delivery"] == message["id"]
        and request["headers"]["X-Distill-Event"] == message["type"]
    )
    found = delivery(job_id)
    assert found.status == "delivered" and found.id == message["id"] and found.delivered_at
    return message


@pytest.mark.slow
def test_jobs_run_by_a_worker_send_one_signed_message_each_and_their_cards_hold_their_scores(
    client, dataset, worker, receiver, tmp_path
):
    name = f"cli-{os.urandom(3).hex()}"
    auth = make_user(name)
    # The operator sets the user's webhook with the command line, which shows the secret this once.
    set_hook = subprocess.run(
        [sys.executable, "-m", "app.cli", "users", "webhook", name, receiver.url, "--json"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert set_hook.returncode == 0, set_hook.stderr
    shown = json.loads(set_hook.stdout)
    assert shown["webhook_url"] == receiver.url and shown["secret"].startswith("whsec_")
    again = subprocess.run(
        [sys.executable, "-m", "app.cli", "users", "webhook", name, "--json"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert json.loads(again.stdout) == {"name": name, "webhook_url": receiver.url}  # never shown again

    ok = submit(client, auth, tiny_spec(dataset))
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "not a number"}')
    bad = submit(client, auth, tiny_spec(dataset, teacher=str(broken)))

    done = wait_status(client, auth, ok, {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    message = one_message(receiver, ok, shown["secret"])
    assert (
        message["type"] == "job.succeeded"
        and message["job"]["status"] == "succeeded"
        and message["job"]["error"] is None
    )
    assert message["job"]["name"] == "tiny" and message["job"]["best_eval"] == done["best_eval"]
    assert message["job"]["finished_at"] and message["job"]["started_at"] and message["job"]["created_at"]
    assert message["links"]["job"] == f"/api/v1/jobs/{ok}"
    assert client.get(message["links"]["checkpoints"], headers=auth).status_code == 200

    # The final checkpoint's model card: hub metadata whose model-index holds the scores the job reported.
    readme = client.get(f"/api/v1/jobs/{ok}/checkpoints/latest/files/README.md", headers=auth)
    assert readme.status_code == 200
    (tmp_path / "README.md").write_bytes(readme.content)
    card = ModelCard.load(tmp_path / "README.md")
    evals = client.get(f"/api/v1/jobs/{ok}/evals", headers=auth).json()
    for split, label in (("test", "final"), ("selection", "selection")):  # the last selection eval is at the final step
        scores = [e for e in evals if e["label"] == label][-1]["scores"]
        assert {r.metric_type: r.metric_value for r in card.data.eval_results if r.dataset_split == split} == {
            METRIC_NAMES.get(key, (key,))[0]: value for key, value in scores.items()
        }
    assert "/tmp/" not in readme.text and os.environ["DISTILL_ARTIFACTS_DIR"] not in readme.text
    assert "AutoModelForCausalLM.from_pretrained" in readme.text

    failed = wait_status(client, auth, bad, {"succeeded", "failed"})
    assert failed["status"] == "failed"
    message = one_message(receiver, bad, shown["secret"])
    assert message["type"] == "job.failed" and message["job"]["error"] == failed["error"]


def test_a_job_cancelled_while_queued_sends_one_message_to_its_requests_url(client, dataset, receiver):
    auth, secret = user_with_webhook("http://127.0.0.1:9/the-default-is-not-used")
    request = tiny_spec(dataset, notify={"webhook_url": receiver.url + "?from=spec"})
    checked = client.post("/api/v1/jobs/validate", json=request, headers=auth).json()
    assert checked["notify"] == request["notify"]
    job_id = submit(client, auth, request)
    # Beside the spec, not in it: the engine never sees it, and a clone of the spec does not inherit it.
    shown = client.get(f"/api/v1/jobs/{job_id}", headers=auth).json()
    assert "notify" not in shown["spec"] and shown["notify"] == request["notify"]
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth).json()["status"] == "cancelled"
    message = one_message(receiver, job_id, secret)
    assert message["type"] == "job.cancelled" and message["job"]["started_at"] is None
    assert receiver.accepted()[0]["path"] == "/hooks/distill?from=spec"


def test_a_job_whose_worker_is_lost_sends_one_failed_message(client, dataset, receiver):
    auth, secret = user_with_webhook(receiver.url)
    job_id = submit(client, auth, tiny_spec(dataset))
    with session_factory()() as session:
        job_status.claim(session, job_id, "a-worker-that-dies")
        session.execute(update(Job).where(Job.id == job_id).values(max_attempts=1))
        session.commit()
    wait_status(client, auth, job_id, {"failed"}, timeout=60)  # the API's reaper, after the heartbeat timeout
    message = one_message(receiver, job_id, secret)
    assert message["job"]["error"]["code"] == "WorkerLost"


def test_a_receiver_that_fails_twice_still_gets_exactly_one_message(client, dataset):
    receiver = Receiver(fail_first=2).start()
    try:
        auth, secret = user_with_webhook(receiver.url)
        job_id = end_job(client, auth, dataset, "failed")
        message = one_message(receiver, job_id, secret)
        assert message["job"]["error"] == {"code": "Boom", "message": "it broke"}
        assert [r["status"] for r in receiver.requests] == [500, 500, 200]
        assert (
            len({r["headers"]["X-Distill-Delivery"] for r in receiver.requests}) == 1
        )  # the same delivery, tried again
    finally:
        receiver.stop()


def test_a_receiver_that_is_down_for_a_while_gets_the_message_once_it_is_back(client, dataset):
    receiver = Receiver()  # its port refuses connections until it starts
    auth, secret = user_with_webhook(receiver.url)
    job_id = end_job(client, auth, dataset)
    wait_for(lambda: delivery(job_id).attempts >= 2, timeout=60, interval=0.2, what="two failed rounds")
    pending = delivery(job_id)
    assert pending.status == "pending" and "ConnectError" in pending.last_error and pending.next_attempt_at
    receiver.start()
    try:
        one_message(receiver, job_id, secret)
    finally:
        receiver.stop()


def test_reapers_sending_at_once_deliver_each_message_once(client, dataset):
    receiver = Receiver(delay=0.2).start()  # a slow receiver: rounds overlap
    try:
        auth, secret = user_with_webhook(None)
        jobs = [end_job(client, auth, dataset) for _ in range(8)]  # no webhook yet: nothing to send
        with session_factory()() as session:  # then all eight due at once, as if they had ended together
            session.execute(update(User).where(User.webhook_secret == secret).values(webhook_url=receiver.url))
            for job_id in jobs:
                webhooks.stage_delivery(session, job_id)
            session.commit()
        shares: list[list[str]] = []
        senders = [threading.Thread(target=lambda: shares.append(webhooks.deliver_due())) for _ in range(4)]
        for sender in senders:  # beside the API's own reaper, which sends too
            sender.start()
        for sender in senders:
            sender.join()
        wait_for(lambda: len(receiver.accepted()) >= len(jobs), timeout=60, interval=0.2, what="every message")
        time.sleep(3 * get_settings().heartbeat_seconds)
        for job_id in jobs:
            one_message(receiver, job_id, secret, settle=False)
        mine = [d for share in shares for d in share]
        assert len(mine) == len(set(mine))  # no two senders delivered the same row
        assert sum(1 for share in shares if share) >= 2  # though they sent at the same time
        assert len(receiver.requests) == len(jobs)  # and nothing was sent twice
    finally:
        receiver.stop()


def test_webhooks_go_only_to_public_addresses_unless_the_operator_allows_others(client, dataset, monkeypatch, receiver):
    strict = get_settings().model_copy(update={"webhook_allow_private": False})
    for url in (
        "http://127.0.0.1:8000/x",
        "http://localhost/x",
        "https://10.1.2.3/x",
        "http://[::ffff:192.168.0.1]/x",
        "http://169.254.169.254/latest/meta-data",
        # The metadata address in IPv6 forms that reach it: NAT64, 6to4, IPv4-compatible, mapped; and
        # NAT64's local-use prefix, Teredo, the unspecified and loopback addresses.
        "http://[64:ff9b::a9fe:a9fe]/x",
        "http://[2002:a9fe:a9fe::1]/x",
        "http://[::a9fe:a9fe]/x",
        "http://[::ffff:169.254.169.254]/x",
        "http://[64:ff9b:1::808:808]/x",
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/x",
        "http://[::]/x",
        "http://[::1]/x",
    ):
        assert "not a public address" in webhooks.url_problem(url, strict), url
    for url in (
        "https://hooks.example.com/x",
        "http://8.8.8.8/x",
        "http://[64:ff9b::808:808]/x",
        "http://[2002:808:808::1]/x",
    ):
        assert webhooks.url_problem(url, strict) is None, url  # names are checked when sent; public addresses pass
    with pytest.raises(webhooks.Refused):
        anyio.run(webhooks._resolve, "localhost", 80, strict)

    # When sent: a name that resolves to a private address is refused for good, and nothing is sent.
    monkeypatch.setattr(webhooks, "get_settings", lambda: strict)
    auth, secret = user_with_webhook(receiver.url.replace("127.0.0.1", "localhost"))
    job_id = end_job(client, auth, dataset)
    wait_for(lambda: delivery(job_id).status == "failed", timeout=30, interval=0.2, what="the delivery to be refused")
    assert "not a public address" in delivery(job_id).last_error and not receiver.requests


def test_a_spec_webhook_needs_a_secret_to_sign_with(client, dataset):
    auth = make_user()
    response = client.post(
        "/api/v1/jobs/validate", json=tiny_spec(dataset, notify={"webhook_url": "https://example.com/h"}), headers=auth
    )
    assert response.status_code == 422
    assert [(d["loc"], "no webhook secret" in d["msg"]) for d in response.json()["detail"]] == [
        (["body", "notify", "webhook_url"], True)
    ]
    bad = client.post(
        "/api/v1/jobs/validate", json=tiny_spec(dataset, notify={"webhook_url": "ftp://example.com/h"}), headers=auth
    )
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-2:] == ["notify", "webhook_url"]
    for url in ("https://example.com/a b", "https://example.com/\x07"):  # a space, a control character
        odd = client.post("/api/v1/jobs/validate", json=tiny_spec(dataset, notify={"webhook_url": url}), headers=auth)
        assert (
            odd.status_code == 422 and "must not contain spaces or control characters" in odd.json()["detail"][0]["msg"]
        )


def test_users_set_their_own_webhook_and_its_secret_through_the_api(client, dataset, receiver):
    auth, other = make_user(), make_user()
    hook = "/api/v1/me/webhook"
    assert client.get(hook, headers=auth).json() == {"url": None, "has_secret": False, "secret": None}
    refused = client.post(
        "/api/v1/jobs/validate", json=tiny_spec(dataset, notify={"webhook_url": receiver.url}), headers=auth
    )
    assert "`distill webhook --new-secret`" in refused.json()["detail"][0]["msg"]

    bad = client.put(hook, json={"url": "ftp://example.com/h"}, headers=auth)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "url"]
    assert client.get(hook, headers=auth).json()["has_secret"] is False  # nothing stored

    made = client.put(hook, json={"url": receiver.url}, headers=auth).json()
    assert made["url"] == receiver.url and made["has_secret"] and made["secret"].startswith("whsec_")
    assert client.get(hook, headers=auth).json() == {
        "url": receiver.url,
        "has_secret": True,
        "secret": None,
    }  # never shown again
    assert client.put(hook, json={"url": receiver.url}, headers=auth).json()["secret"] is None  # kept, not made again
    assert client.get(hook, headers=other).json()["url"] is None  # each user's own
    assert (
        client.post(
            "/api/v1/jobs/validate", json=tiny_spec(dataset, notify={"webhook_url": receiver.url}), headers=auth
        ).status_code
        == 200
    )

    first = end_job(client, auth, dataset)
    one_message(receiver, first, made["secret"])
    rotated = client.put(hook, json={"url": receiver.url, "new_secret": True}, headers=auth).json()["secret"]
    assert rotated.startswith("whsec_") and rotated != made["secret"]
    second = end_job(client, auth, dataset)
    one_message(receiver, second, rotated)

    cleared = client.put(hook, json={"url": None}, headers=auth).json()
    assert cleared == {"url": None, "has_secret": True, "secret": None}
    third = end_job(client, auth, dataset)
    time.sleep(3 * get_settings().heartbeat_seconds)
    assert delivery(third) is None and not messages_for(receiver, third)  # no webhook: nothing staged or sent


def test_a_user_may_not_point_their_webhook_inside_the_servers_network(client):
    auth = make_user()
    strict = get_settings().model_copy(update={"webhook_allow_private": False})
    client.app.dependency_overrides[get_settings] = lambda: strict
    try:
        response = client.put("/api/v1/me/webhook", json={"url": "http://10.0.0.7/hook"}, headers=auth)
    finally:
        del client.app.dependency_overrides[get_settings]
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "url"] and "not a public address" in error["msg"]
    assert client.get("/api/v1/me/webhook", headers=auth).json()["url"] is None


def test_the_command_line_sets_the_users_own_webhook(server, client, receiver):
    auth = make_user()
    token = auth["Authorization"].removeprefix("Bearer ")

    def distill(*args: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", "webhook", *args, "--json", "--url", server, "--token", token],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    made = distill(receiver.url)
    assert made["url"] == receiver.url and made["secret"].startswith("whsec_")
    assert distill() == {"url": receiver.url, "has_secret": True, "secret": None}
    rotated = distill("--new-secret")  # the URL stays
    assert rotated["url"] == receiver.url and rotated["secret"] not in (None, made["secret"])
    assert distill("--clear")["url"] is None
    assert client.get("/api/v1/me/webhook", headers=auth).json() == {"url": None, "has_secret": True, "secret": None}


def test_an_https_receiver_is_checked_against_the_urls_host_and_the_operators_ca(tmp_path):
    """The message goes to the address the name resolved to, yet TLS checks the certificate against
    the URL's host name; certificates of an operator's own CA pass only with DISTILL_WEBHOOK_CA_FILE."""
    ca = trustme.CA()
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_side)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    trusting = get_settings().model_copy(update={"webhook_ca_file": tmp_path / "ca.pem"})
    message = {"id": "whd-tls", "type": "job.succeeded", "job": {"id": "job-tls"}}
    receiver = Receiver(tls=server_side).start()
    try:
        webhooks._send(receiver.https_url("localhost"), message, "whsec_tls", trusting)
        [request] = receiver.accepted()
        assert json.loads(request["body"]) == message and request["headers"]["Host"] == f"localhost:{receiver.port}"
        assert readme_verify()("whsec_tls", request["headers"]["X-Distill-Signature"], request["body"])

        # The same certificate named by address: it is not the name the certificate holds.
        with pytest.raises(webhooks.DeliveryError, match="CERTIFICATE_VERIFY_FAILED.*IP address mismatch"):
            webhooks._send(receiver.https_url("127.0.0.1"), message, "whsec_tls", trusting)
        # Without the operator's CA, only public CAs are trusted.
        with pytest.raises(webhooks.DeliveryError, match="CERTIFICATE_VERIFY_FAILED.*unable to get local issuer"):
            webhooks._send(receiver.https_url("localhost"), message, "whsec_tls", get_settings())
        assert len(receiver.requests) == 1  # a refused certificate: nothing was sent
    finally:
        receiver.stop()


def test_a_webhook_ca_file_that_is_not_there_is_a_settings_error_naming_it(tmp_path):
    from pydantic import ValidationError

    from app.core.config import Settings

    with pytest.raises(ValidationError, match="webhook_ca_file"):
        Settings(webhook_ca_file=tmp_path / "missing.pem")


def test_a_receiver_that_answers_too_slowly_is_a_failed_try_bounded_in_time():
    slow = Receiver(delay=3).start()
    try:
        quick = get_settings().model_copy(update={"webhook_timeout_seconds": 0.5})
        started = time.monotonic()
        with pytest.raises(webhooks.DeliveryError, match="no answer within 0.5 s"):
            webhooks._send(
                slow.url, {"id": "whd-test", "type": "job.succeeded", "job": {"id": "job-none"}}, "whsec_x", quick
            )
        assert time.monotonic() - started < 2
    finally:
        slow.stop()

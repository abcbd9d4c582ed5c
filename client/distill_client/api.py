"""The Python client of the API, for CI scripts (and the `distill` command line):

    from pathlib import Path
    from distill_client import Client, JobStatus, load_spec_file

    with Client("https://distill.example.com", token) as client:   # default: DISTILL_URL, DISTILL_TOKEN
        job = client.jobs.create(load_spec_file(Path("ci/distill.yaml"), ["training.steps=200"]))
        job = client.jobs.wait(job.id)                             # a JobOut; job.status, job.best_eval
        if job.status == JobStatus.SUCCEEDED:
            client.checkpoints.download(job.id, "best", Path("models"))

Answers are the API's own response models (distill_client.models). It writes no file but the downloads
it is asked for.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Callable, Optional, Union

import httpx
import yaml
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from .models import (
    CheckpointOut,
    DatasetOut,
    Deleted,
    EvalOut,
    EvalSamplesOut,
    EventOut,
    JobOut,
    Page,
    WebhookOut,
    error_body,
)
from .status import TERMINAL, JobStatus

log = logging.getLogger(__name__)
# The media types of uploads by suffix; anything else is sent as JSONL.
UPLOAD_TYPES = {".parquet": "application/vnd.apache.parquet", ".arrow": "application/vnd.apache.arrow.file"}
# What a proxy or load balancer answers while the API restarts or is overloaded: the API did not refuse.
TRANSIENT_STATUSES = (502, 503, 504)


class ApiError(RuntimeError):
    """An error the API answered (its ErrorOut): `status_code`, `message` for people, and `detail`,
    the list of {loc, msg, type} (for a 422, one per bad field, `loc` naming it)."""

    def __init__(self, status_code: int, message: str, detail: Optional[list[dict]] = None):
        self.status_code, self.message = status_code, message
        self.detail = detail if detail is not None else error_body(status_code, message)["detail"]
        super().__init__(f"HTTP {status_code}: {' '.join(message.split())[:300]}")  # one line, even of an HTML page

    @classmethod
    def of(cls, response: httpx.Response) -> ApiError:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return cls(response.status_code, body["message"], body.get("detail"))
        return cls(response.status_code, response.text.strip() or response.reason_phrase)  # a proxy's page, say


class ChecksumMismatch(RuntimeError):
    """A downloaded file whose SHA-256 is not the one the API listed."""


class SpecFileError(ValueError):
    """A spec file that cannot be read, or an override that does not apply to it."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _transient(err: BaseException, repeatable: bool) -> bool:
    """Whether a failed request is worth repeating: it never reached the server, or (when it may be
    sent twice) the connection broke, it timed out, or a proxy stood in for the API."""
    if isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout)):
        return True
    if not repeatable:
        return False
    if isinstance(err, ApiError):
        return err.status_code in TRANSIENT_STATUSES
    return isinstance(err, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError))


def _say_retry(state: RetryCallState) -> None:
    method, url = state.args[:2]
    log.warning("%s %s: %s; trying again in %.0f s", method, url, state.outcome.exception(), state.next_action.sleep)


class Client:
    """The API at `url` with `token` (default: DISTILL_URL and DISTILL_TOKEN), as `jobs`, `datasets`,
    `checkpoints` and `me`. A request that fails on the way (connection refused or broken, a timeout, a
    502/503/504 from a proxy) is repeated with exponential backoff for up to `retry_seconds`, so a
    blip during an hours-long wait does not end it; an error the API itself answers raises ApiError
    at once. `http`: an already configured client (FastAPI's TestClient, say) instead of url and token."""

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        *,
        retry_seconds: float = 300,
        timeout: float = 60,
        http: Optional[httpx.Client] = None,
    ):
        if http is None:
            url, token = url or os.environ.get("DISTILL_URL"), token or os.environ.get("DISTILL_TOKEN")
            if not url:
                raise ValueError("no API address: pass url, or set DISTILL_URL")
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            # Redirects: checkpoints kept in S3 are served from presigned URLs (httpx drops the token there).
            http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, follow_redirects=True)
        self.http, self.retry_seconds = http, retry_seconds
        self.jobs, self.datasets, self.checkpoints, self.me = Jobs(self), Datasets(self), Checkpoints(self), Me(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_) -> None:
        self.http.close()

    def request(self, method: str, path: str, *, repeatable: bool = True, **kwargs) -> httpx.Response:
        """`method` on /api/v1`path` (httpx's keyword arguments), repeated as the class says; an error
        answer raises ApiError. A request that must not reach the server twice (`repeatable=False`)
        is repeated only when it never reached it."""
        return self.retrying(repeatable)(self._send, method, f"/api/v1{path}", **kwargs)

    def retrying(self, repeatable: bool = True) -> Retrying:
        """tenacity's loop for a request: what is repeated, how long to wait, when to stop."""
        return Retrying(
            retry=retry_if_exception(lambda err: _transient(err, repeatable)),
            reraise=True,
            wait=wait_exponential_jitter(initial=1, max=30),
            stop=stop_after_delay(self.retry_seconds),
            before_sleep=_say_retry,
        )

    def _send(self, method: str, url: str, **kwargs) -> httpx.Response:
        response = self.http.request(method, url, **kwargs)
        if response.status_code >= 400:
            raise ApiError.of(response)
        return response


class Jobs:
    def __init__(self, client: Client):
        self._client = client

    def create(self, spec: dict, idempotency_key: Optional[str] = None) -> JobOut:
        """Submit a job (the API checks it fully first; a bad spec is an ApiError 422). Without an
        `idempotency_key` a fresh one is sent, so that repeating the request never makes a second job."""
        key = idempotency_key or f"client-{uuid.uuid4()}"
        return JobOut.model_validate(
            self._client.request("POST", "/jobs", json=spec, headers={"Idempotency-Key": key}).json()
        )

    def validate(self, spec: dict) -> dict:
        """Every check submit runs, queueing nothing: the spec as a job would store it (defaults filled
        in), or the ApiError 422 submit would raise."""
        return self._client.request("POST", "/jobs/validate", json=spec).json()

    def list(
        self,
        status: Optional[JobStatus] = None,
        page_size: int = 100,
        metadata: Optional[dict[str, str]] = None,
        after: Optional[str] = None,
    ) -> Iterator[JobOut]:
        """Every job (with `status`, those in it; with `metadata`, those with each pair), newest first,
        from the one after job `after`; pages are fetched as the iteration reaches them."""
        params: dict = {"limit": page_size, **({"status": status} if status else {})}
        if metadata:
            params["metadata"] = [f"{key}:{value}" for key, value in metadata.items()]
        if after:
            params["after"] = after
        while True:
            page = Page[JobOut].model_validate(self._client.request("GET", "/jobs", params=params).json())
            yield from page.data
            if not (page.has_more and page.data):
                return
            params["after"] = page.data[-1].id

    def retrieve(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._client.request("GET", f"/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> JobOut:
        """Cancel a job: at once if queued, within seconds if running. A job that has already ended
        is returned as it is, so a repeated cancel (or a retried one) does no harm."""
        try:
            return JobOut.model_validate(self._client.request("POST", f"/jobs/{job_id}/cancel").json())
        except ApiError as err:
            if err.status_code != 409:
                raise
            return self.retrieve(job_id)

    def resume(self, job_id: str) -> JobOut:
        """Continue a failed or cancelled job from its newest checkpoint, as a new attempt."""
        return JobOut.model_validate(self._client.request("POST", f"/jobs/{job_id}/resume", repeatable=False).json())

    def delete(self, job_id: str) -> Deleted:
        """Delete a job that has ended, with everything it wrote (an ApiError 409 while it runs)."""
        return Deleted.model_validate(self._client.request("DELETE", f"/jobs/{job_id}").json())

    def wait(self, job_id: str, poll_seconds: float = 5.0) -> JobOut:
        """The job once it has ended: succeeded, failed or cancelled."""
        while (job := self.retrieve(job_id)).status not in TERMINAL:
            time.sleep(poll_seconds)
        return job

    def events(
        self, job_id: str, follow: bool = False, poll_seconds: float = 1.0, timeout: Optional[float] = None
    ) -> Iterator[EventOut]:
        """The job's events in order; with `follow`, on until the job has ended (or `timeout` seconds
        have passed: then the iteration ends with the job still going)."""
        params = {"after": 0, "limit": 1000}
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Status before events: a terminal status is committed with its event, so a page read
            # after seeing it holds everything up to the end.
            ended = not follow or self.retrieve(job_id).status in TERMINAL
            page = Page[EventOut].model_validate(
                self._client.request("GET", f"/jobs/{job_id}/events", params=params).json()
            )
            for event in page.data:
                params["after"] = event.id
                yield event
            if page.has_more:
                continue
            if ended or (deadline is not None and time.monotonic() >= deadline):
                return
            time.sleep(poll_seconds)

    def log(self, job_id: str, attempt: Optional[int] = None, tail: Optional[int] = None) -> str:
        """What the training process of an attempt (default: the latest) printed, its server paths
        hidden; with `tail`, its last lines only. The API answers at most a log's last 4 MiB."""
        params = {k: v for k, v in (("attempt", attempt), ("tail", tail)) if v is not None}
        return self._client.request("GET", f"/jobs/{job_id}/logs", params=params).text

    def metrics(self, job_id: str) -> dict[str, list[dict]]:
        """Each metric's series: {name: [{step, value}, ...]} in step order."""
        return self._client.request("GET", f"/jobs/{job_id}/metrics").json()

    def evals(self, job_id: str) -> list[EvalOut]:
        return [EvalOut.model_validate(e) for e in self._client.request("GET", f"/jobs/{job_id}/evals").json()]

    def samples(self, job_id: str) -> list[EvalSamplesOut]:
        """The sample generations each evaluation kept (prompt, reference, the model's answer)."""
        return [EvalSamplesOut.model_validate(e) for e in self._client.request("GET", f"/jobs/{job_id}/samples").json()]


class Datasets:
    def __init__(self, client: Client):
        self._client = client

    def upload(self, path: Path, content: Optional[bytes] = None) -> DatasetOut:
        """Upload a JSONL, Parquet or Arrow file (or `content` under its name; the server reads it by
        the name's suffix). Repeated only if it never reached the server: a repeat after a lost answer
        would store the dataset twice."""
        answer = self._client.request(
            "POST",
            "/datasets",
            repeatable=False,
            params={"name": path.name},
            content=path.read_bytes() if content is None else content,
            headers={"Content-Type": UPLOAD_TYPES.get(path.suffix.lower(), "application/x-ndjson")},
        )
        return DatasetOut.model_validate(answer.json())

    def list(self) -> list[DatasetOut]:
        return [DatasetOut.model_validate(d) for d in self._client.request("GET", "/datasets").json()]

    def delete(self, dataset_id: str) -> Deleted:
        """Delete an upload, freeing its bytes of your quota (an ApiError 409 while a running job reads it)."""
        return Deleted.model_validate(self._client.request("DELETE", f"/datasets/{dataset_id}").json())


class Me:
    """What the signed-in user manages: their default webhook."""

    def __init__(self, client: Client):
        self._client = client

    def webhook(self) -> WebhookOut:
        return WebhookOut.model_validate(self._client.request("GET", "/me/webhook").json())

    def set_webhook(self, url: Optional[str], new_secret: bool = False) -> WebhookOut:
        """Set (None: remove) the default webhook URL. The answer holds the signing secret when one
        was made: the first time, or with `new_secret`. Repeated only if it never reached the server:
        an answer lost on the way would take with it a secret that is not shown again."""
        answer = self._client.request(
            "PUT", "/me/webhook", repeatable=False, json={"url": url, "new_secret": new_secret}
        )
        return WebhookOut.model_validate(answer.json())


class Checkpoints:
    def __init__(self, client: Client):
        self._client = client

    def list(self, job_id: str) -> list[CheckpointOut]:
        """The job's checkpoints, oldest first, with sizes and SHA-256; `latest` and `best` marked."""
        return [
            CheckpointOut.model_validate(c) for c in self._client.request("GET", f"/jobs/{job_id}/checkpoints").json()
        ]

    def download(
        self, job_id: str, step: Union[str, int], out: Path, progress: Optional[Callable[[int, int], None]] = None
    ) -> Path:
        """Download checkpoint `step` (a number, "latest" or "best") into `out` and unpack it; returns
        the model directory. A broken transfer goes on where it stopped (a Range request, also when
        called again); the archive's SHA-256 and every file's are checked. `progress(done, total)`
        is called with bytes as they arrive."""
        chosen = next(
            (
                c
                for c in self.list(job_id)
                if str(c.step) == str(step) or (step == "latest" and c.latest) or (step == "best" and c.best)
            ),
            None,
        )
        if chosen is None:
            raise ApiError(404, f"job {job_id} has no checkpoint {step!r}")
        out.mkdir(parents=True, exist_ok=True)
        partial = out / f"{job_id}-step-{chosen.step}.tar.partial"
        url = f"/api/v1/jobs/{job_id}/checkpoints/{chosen.step}/archive"
        self._client.retrying()(self._fetch, "GET", url, partial, chosen.archive_size, progress)
        if sha256_file(partial) != chosen.archive_sha256:
            partial.unlink()
            raise ChecksumMismatch("the downloaded archive does not match its SHA-256; it was removed, download again")
        if not hasattr(tarfile, "data_filter"):
            raise RuntimeError("unpacking needs tarfile's data filter: Python 3.9.17, 3.10.12, 3.11.4 or newer")
        with tarfile.open(partial) as tar:
            tar.extractall(out, filter="data")
            names = tar.getnames()
        model_dir = out / Path(names[0]).parts[0]
        for entry in chosen.files:
            if sha256_file(model_dir / entry.name) != entry.sha256:
                raise ChecksumMismatch(f"{entry.name} does not match its SHA-256")
        partial.unlink()
        return model_dir

    def _fetch(
        self, method: str, url: str, partial: Path, total: int, progress: Optional[Callable[[int, int], None]]
    ) -> None:
        """The archive's bytes appended to `partial` from where it ends (`method` and `url` first, as
        the retry log names them)."""
        have = partial.stat().st_size if partial.exists() else 0
        with self._client.http.stream(method, url, headers={"Range": f"bytes={have}-"} if have else {}) as response:
            if response.status_code == 416:  # already complete
                return
            if response.status_code >= 400:
                response.read()
                raise ApiError.of(response)
            if response.status_code != 206:  # the whole file again
                have = 0
            with partial.open("ab" if have else "wb") as f:
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)
                    have += len(chunk)
                    if progress:
                        progress(have, total)


def load_spec_file(path: Path, overrides: Iterable[str] = ()) -> dict:
    """A spec file (YAML or JSON) as a mapping, with each `a.b.c=VALUE` of `overrides` set in it:
    VALUE is read as YAML (`200`, `true`, `1.0e-4`, `[1, 2]`, `null`), and missing sections are made."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecFileError(f"{path}: not valid YAML or JSON: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise SpecFileError(f"{path}: a spec is a mapping of fields")
    for override in overrides:
        dotted, equals, text = override.partition("=")
        keys = dotted.strip().split(".")
        if not equals or not all(keys):
            raise SpecFileError(
                f"override {override!r}: expected a dotted path, =, and a value, like training.steps=200"
            )
        section = data
        for key in keys[:-1]:
            if section.get(key) is None:
                section[key] = {}
            section = section[key]
            if not isinstance(section, dict):
                raise SpecFileError(f"override {override!r}: {key} is not a section of fields")
        try:
            section[keys[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SpecFileError(f"override {override!r}: the value is not YAML: {' '.join(str(err).split())}") from None
    return data

"""A small HTTP client of the API, used by the `distill` command line (and usable from CI scripts)."""

from __future__ import annotations

import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from tqdm import tqdm

from app.core.config import get_settings
from app.core.files import sha256_file
from app.models import TERMINAL


class ApiError(RuntimeError):
    def __init__(self, response: httpx.Response):
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        if isinstance(detail, list):  # validation errors: one line per field
            detail = "; ".join(f"{'.'.join(str(p) for p in d['loc'][1:]) or 'body'}: {d['msg']}" for d in detail)
        super().__init__(f"HTTP {response.status_code}: {detail}")
        self.status_code = response.status_code


def default_token() -> str | None:
    """DISTILL_TOKEN, else the local user's token that `distill up` saved."""
    token = os.environ.get("DISTILL_TOKEN")
    path = get_settings().data_dir / "token"
    return token or (path.read_text().strip() if path.exists() else None)


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, http: httpx.Client | None = None):
        """`http`: an already configured client (for example FastAPI's TestClient) instead of url and token."""
        settings = get_settings()
        self.url = (url or os.environ.get("DISTILL_URL") or f"http://{settings.host}:{settings.port}").rstrip("/")
        token = token or default_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Redirects: checkpoints kept in S3 are served from presigned URLs (httpx drops the token there).
        self.http = http or httpx.Client(base_url=self.url, headers=headers, timeout=60, follow_redirects=True)

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise ApiError(response)
        return response

    def get(self, path: str, **params) -> dict | list:
        return self._check(self.http.get(f"/api/v1{path}", params=params)).json()

    def post(self, path: str, **kwargs) -> dict:
        return self._check(self.http.post(f"/api/v1{path}", **kwargs)).json()

    def submit(self, spec: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.post("/jobs", json=spec, headers=headers)

    def upload_dataset(self, path: Path, content: bytes | None = None) -> dict:
        """Upload a JSONL file (or `content` under its name)."""
        return self.post("/datasets", params={"name": path.name}, content=path.read_bytes() if content is None else content,
                         headers={"Content-Type": "application/x-ndjson"})  # fmt: skip

    def events(self, job_id: str, follow: bool) -> Iterator[dict]:
        """Every event of the job in order; with `follow`, until the job has ended."""
        after = 0
        while True:
            # Status before events: a terminal status is committed with its event, so a page read
            # after seeing it holds everything up to the end.
            ended = not follow or self.get(f"/jobs/{job_id}")["status"] in TERMINAL
            page = self.get(f"/jobs/{job_id}/events", after=after, limit=1000)
            for event in page["data"]:
                after = event["id"]
                yield event
            if page["has_more"]:
                continue
            if ended:
                return
            time.sleep(1.0)

    def download(self, job_id: str, step: str, out: Path) -> Path:
        """Download a checkpoint archive (resuming a partial one with a Range request), check its
        SHA-256 and every file's, and unpack it into `out`. Returns the model directory."""
        listing = self.get(f"/jobs/{job_id}/checkpoints")
        chosen = next((c for c in listing if (str(c["step"]) == step or (step == "latest" and c["latest"])
                                              or (step == "best" and c["best"]))), None)  # fmt: skip
        if chosen is None:
            raise RuntimeError(f"job {job_id} has no checkpoint {step!r}")
        out.mkdir(parents=True, exist_ok=True)
        partial = out / f"{job_id}-step-{chosen['step']}.tar.partial"
        have = partial.stat().st_size if partial.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        url = f"/api/v1/jobs/{job_id}/checkpoints/{chosen['step']}/archive"
        with self.http.stream("GET", url, headers=headers) as response:
            if response.status_code == 416:  # already complete
                pass
            else:
                self._check(response)
                mode = "ab" if response.status_code == 206 else "wb"
                with partial.open(mode) as f, tqdm(total=chosen["archive_size"], initial=have if mode == "ab" else 0,
                                                   unit="B", unit_scale=True, desc="download") as bar:  # fmt: skip
                    for chunk in response.iter_bytes(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        if sha256_file(partial) != chosen["archive_sha256"]:
            partial.unlink()
            raise RuntimeError("the downloaded archive does not match its SHA-256; it was removed, download again")
        with tarfile.open(partial) as tar:
            tar.extractall(out, filter="data")
            names = tar.getnames()
        model_dir = out / Path(names[0]).parts[0]
        for entry in chosen["files"]:
            if sha256_file(model_dir / entry["name"]) != entry["sha256"]:
                raise RuntimeError(f"{entry['name']} does not match its SHA-256")
        partial.unlink()
        return model_dir


def load_spec_file(path: Path) -> dict:
    import yaml

    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a spec is a mapping of fields")
    return data


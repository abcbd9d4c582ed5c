"""A catalogue of hostile requests: each is answered with the 4xx it names, in the one error shape
(app.schemas.ErrorOut), the error names the field (a 422's `detail[].loc`, or the words of any other
4xx's `message`), and nothing is stored: no job,
no dataset, no file left behind. Another user's jobs, datasets, checkpoints and events answer exactly
as missing ones do.

To add a case, append a `Hostile` to CASES. In a URL, a header or a spec, `<name>` stands for a value
of the `world` fixture: `<mine>` and `<theirs>` (a job of the signed-in user and of another user, each
ended, with a checkpoint at step 3), `<their_dataset>`, `<archive_link>` and `<file_link>` (signed
links to <mine>'s latest checkpoint and its config.json), `<expired_link>`, and the tokens
`<expired_token>` and `<revoked_token>`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs

import pytest
from helpers import make_user
from sqlalchemy import func, select

from app.schemas import ErrorOut

JOBS = "/api/v1/jobs"
DATASETS = "/api/v1/datasets"


def spec(**overrides) -> dict:
    """A spec the API accepts (test_the_base_spec_is_accepted); each case breaks one thing in it."""
    base = {
        "name": "hostile",
        "method": "sft",
        "teacher": "builtin:tiny-teacher",
        "student": {"model": "builtin:tiny-student"},
        "data": {"train": "builtin:demo"},
        "training": {"steps": 4, "batch_size": 2},
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return base


def raw_spec(**overrides) -> bytes:
    """A spec as JSON text, where a number Python cannot write (1e999, NaN) can stand: `"@@"` is replaced."""
    return json.dumps(spec(**overrides)).encode()


@dataclass(frozen=True)
class Hostile:
    id: str
    method: str
    url: str
    status: int
    # A 422 names its field by `loc` (in its `detail` list); any other 4xx says it in `words`, in its `message`.
    loc: tuple | None = None
    words: str = ""
    json: Any = None
    content: bytes | None = None
    headers: dict = field(default_factory=dict)  # beside the signed-in user's token, unless `token` is False
    token: bool = True
    settings: dict = field(default_factory=dict)  # app settings changed for this case only


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


JSON = {"Content-Type": "application/json"}
GOOD_LINE = b'{"instruction": "a", "output": "b"}\n'
SECRET = "their-secret"  # in the other user's job name, checkpoint files and dataset: never in an answer to us
OWN_ROUTES = [
    "",
    "/events",
    "/events/stream",
    "/metrics",
    "/evals",
    "/checkpoints",
    "/checkpoints/latest/archive",
    "/checkpoints/3/files/config.json",
]
LINK_ROUTES = ["/checkpoints/latest/archive/link", "/checkpoints/3/files/config.json/link", "/cancel"]

CASES = [
    # -- job specs: numbers, text and shapes the columns, the C code and the schema refuse
    Hostile(
        "steps past 32 bits",
        "POST",
        JOBS,
        422,
        ("body", "training", "steps"),
        "less than or equal to 1000000",
        json=spec(training={"steps": 2**31}),
    ),
    Hostile(
        "seed below 32 bits",
        "POST",
        JOBS,
        422,
        ("body", "training", "seed"),
        "-2147483648",
        json=spec(training={"seed": -(2**31) - 1}),
    ),
    Hostile(
        "eval seed past 32 bits",
        "POST",
        JOBS,
        422,
        ("body", "eval", "seeds"),
        "2147483647",
        json=spec(eval={"seeds": [1, 2**40]}),
    ),
    Hostile(
        "learning_rate 1e999",
        "POST",
        JOBS,
        422,
        ("body", "training", "learning_rate"),
        "finite",
        content=raw_spec(training={"learning_rate": "@@"}).replace(b'"@@"', b"1e999"),
        headers=JSON,
    ),
    Hostile(
        "learning_rate NaN",
        "POST",
        JOBS,
        422,
        ("body", "training", "learning_rate"),
        "finite",
        content=raw_spec(training={"learning_rate": "@@"}).replace(b'"@@"', b"NaN"),
        headers=JSON,
    ),
    Hostile(
        "weight_decay -Infinity",
        "POST",
        JOBS,
        422,
        ("body", "training", "weight_decay"),
        "finite",
        content=raw_spec(training={"weight_decay": "@@"}).replace(b'"@@"', b"-Infinity"),
        headers=JSON,
    ),
    Hostile("NUL in the name", "POST", JOBS, 422, ("body", "name"), "NUL", json=spec(name="a\x00b")),
    Hostile("NUL in the teacher", "POST", JOBS, 422, ("body", "teacher"), "NUL", json=spec(teacher="builtin:\x00")),
    Hostile(
        "NUL in data.train", "POST", JOBS, 422, ("body", "data", "train"), "NUL", json=spec(data={"train": "a\x00b"})
    ),
    Hostile(
        "teacher path with a 300-byte name",
        "POST",
        JOBS,
        422,
        ("body", "teacher"),
        "longer than a path",
        json=spec(teacher="/" + "a" * 300),
    ),
    Hostile(
        "student path with a 256-byte name",
        "POST",
        JOBS,
        422,
        ("body", "student", "model"),
        "longer than a path",
        json=spec(student={"model": "models/" + "é" * 128}),
    ),
    Hostile(
        "data.train path of 5,000 bytes",
        "POST",
        JOBS,
        422,
        ("body", "data", "train"),
        "longer than a path",
        json=spec(data={"train": "/a" * 2500}),
    ),
    Hostile(
        "data.eval path with a 300-byte name",
        "POST",
        JOBS,
        422,
        ("body", "data", "eval"),
        "longer than a path",
        json=spec(data={"eval": "x" * 300}),
    ),
    Hostile(
        "101 eval seeds",
        "POST",
        JOBS,
        422,
        ("body", "eval", "seeds"),
        "at most 100",
        json=spec(eval={"seeds": list(range(101))}),
    ),
    Hostile("a spec of 5 MB", "POST", JOBS, 413, words="over 1048576 bytes", json=spec(name="x" * 5_000_000)),
    Hostile(
        "a spec of 7 MB of seeds",
        "POST",
        JOBS,
        413,
        words="over 1048576 bytes",
        json=spec(eval={"seeds": list(range(1_000_000))}),
    ),
    Hostile(
        "unknown top-level field",
        "POST",
        JOBS,
        422,
        ("body", "trainig"),
        "extra",
        json={**spec(), "trainig": {"steps": 3}},
    ),
    Hostile(
        "unknown nested field", "POST", JOBS, 422, ("body", "training", "lr"), "extra", json=spec(training={"lr": 0.1})
    ),
    Hostile("invalid method", "POST", JOBS, 422, ("body", "method"), "'minillm'", json=spec(method="minilm")),
    Hostile(
        "invalid zero_stage",
        "POST",
        JOBS,
        422,
        ("body", "deepspeed", "zero_stage"),
        "3",
        json=spec(deepspeed={"zero_stage": 4}),
    ),
    Hostile(
        "invalid precision",
        "POST",
        JOBS,
        422,
        ("body", "deepspeed", "precision"),
        "'bf16'",
        json=spec(deepspeed={"precision": "fp8"}),
    ),
    Hostile(
        "invalid accelerator",
        "POST",
        JOBS,
        422,
        ("body", "resources", "accelerator"),
        "'gpu'",
        json=spec(resources={"accelerator": "tpu"}),
    ),
    Hostile(
        "steps as text",
        "POST",
        JOBS,
        422,
        ("body", "training", "steps"),
        "integer",
        json=spec(training={"steps": "many"}),
    ),
    Hostile(
        "another user's dataset",
        "POST",
        JOBS,
        422,
        ("body", "data", "train"),
        "dataset:<their_dataset>: no such uploaded dataset",
        json=spec(data={"train": "dataset:<their_dataset>"}),
    ),
    Hostile(
        "a dataset that does not exist",
        "POST",
        JOBS,
        422,
        ("body", "data", "train"),
        "dataset:ds-0000000000000000: no such uploaded dataset",
        json=spec(data={"train": "dataset:ds-0000000000000000"}),
    ),
    Hostile("a JSON array for a spec", "POST", JOBS, 422, ("body",), "dictionary", json=[spec()]),
    Hostile("a body that is not JSON", "POST", JOBS, 422, ("body", 1), "JSON decode error", content=b"{", headers=JSON),
    Hostile(
        "Idempotency-Key over 200 characters",
        "POST",
        JOBS,
        422,
        ("header", "idempotency-key"),
        "200",
        json=spec(),
        headers={"Idempotency-Key": "k" * 201},
    ),
    # -- dataset uploads: refused lines are named by number, and no file (.partial or whole) stays
    Hostile(
        "a line nested 100,000 deep",
        "POST",
        f"{DATASETS}?name=deep.jsonl",
        422,
        ("body",),
        "deep.jsonl:2: not valid JSON: nested too deeply",
        content=GOOD_LINE + deep(100_000) + b"\n",
    ),
    Hostile(
        "a 5,000-digit integer",
        "POST",
        f"{DATASETS}?name=digits.jsonl",
        422,
        ("body",),
        "digits.jsonl:1: not valid JSON",
        content=b'{"instruction": "a", "output": ' + b"9" * 5000 + b"}\n",
    ),
    Hostile(
        "an upload above DISTILL_MAX_UPLOAD_BYTES",
        "POST",
        f"{DATASETS}?name=big.jsonl",
        413,
        words="limited to 100 bytes",
        content=GOOD_LINE * 10,
        settings={"max_upload_bytes": 100},
    ),
    Hostile(
        "NUL in a dataset name",
        "POST",
        f"{DATASETS}?name=a%00b.jsonl",
        422,
        ("query", "name"),
        "pattern",
        content=GOOD_LINE,
    ),
    Hostile(
        "an empty dataset name", "POST", f"{DATASETS}?name=", 422, ("query", "name"), "at least 1", content=GOOD_LINE
    ),
    Hostile(
        "a dataset name of 201 characters",
        "POST",
        f"{DATASETS}?name={'n' * 201}",
        422,
        ("query", "name"),
        "at most 200",
        content=GOOD_LINE,
    ),
    # -- listing and event cursors
    Hostile("NUL in the jobs cursor", "GET", f"{JOBS}?after=job-%00", 422, ("query", "after"), "pattern"),
    Hostile("an unknown status filter", "GET", f"{JOBS}?status=paused", 422, ("query", "status"), "'queued'"),
    Hostile("a jobs limit of 10**30", "GET", f"{JOBS}?limit={10**30}", 422, ("query", "limit"), "100"),
    Hostile(
        "events after 2**63", "GET", f"{JOBS}/<mine>/events?after={2**63}", 422, ("query", "after"), str(2**63 - 1)
    ),
    Hostile("events after -1", "GET", f"{JOBS}/<mine>/events?after=-1", 422, ("query", "after"), "0"),
    Hostile("events limit 0", "GET", f"{JOBS}/<mine>/events?limit=0", 422, ("query", "limit"), "1"),
    Hostile(
        "event stream after 2**63",
        "GET",
        f"{JOBS}/<mine>/events/stream?after={2**63}",
        422,
        ("query", "after"),
        str(2**63 - 1),
    ),
    Hostile(
        "event stream Last-Event-ID 2**63",
        "GET",
        f"{JOBS}/<mine>/events/stream",
        422,
        ("header", "last-event-id"),
        str(2**63 - 1),
        headers={"Last-Event-ID": str(2**63)},
    ),
    # -- job ids
    Hostile("NUL in a job id", "GET", f"{JOBS}/job-%00", 422, ("path", "job_id"), "pattern"),
    Hostile("NUL in a job id to cancel", "POST", f"{JOBS}/job-%00/cancel", 422, ("path", "job_id"), "pattern"),
    Hostile("a job id of 10,000 characters", "GET", f"{JOBS}/{'j' * 10_000}", 422, ("path", "job_id"), "64"),
    Hostile(
        "NUL in a job id of a download",
        "GET",
        f"{JOBS}/job-%00/checkpoints/latest/archive",
        422,
        ("path", "job_id"),
        "pattern",
    ),
    # -- another user's job: exactly like one that does not exist, whatever is asked of it
    *[
        Hostile(
            f"another user's job: GET {route or '/'}", "GET", f"{JOBS}/<theirs>{route}", 404, words="no job <theirs>"
        )
        for route in OWN_ROUTES
    ],
    *[
        Hostile(f"another user's job: POST {route}", "POST", f"{JOBS}/<theirs>{route}", 404, words="no job <theirs>")
        for route in LINK_ROUTES
    ],
    # -- checkpoint steps and file names
    Hostile(
        "step ² (a digit to str.isdigit)", "GET", f"{JOBS}/<mine>/checkpoints/²/archive", 404, words="no checkpoint '²'"
    ),
    Hostile(
        "step ² in a link",
        "POST",
        f"{JOBS}/<mine>/checkpoints/²/files/config.json/link",
        404,
        words="no checkpoint '²'",
    ),
    Hostile("step of 30 digits", "GET", f"{JOBS}/<mine>/checkpoints/{'9' * 30}/archive", 404, words="no checkpoint"),
    Hostile(
        "step of 4,400 digits (past int()'s limit)",
        "GET",
        f"{JOBS}/<mine>/checkpoints/{'9' * 4400}/archive",
        404,
        words="no checkpoint '9999",
    ),
    Hostile(
        "step of 4,400 digits in a link",
        "POST",
        f"{JOBS}/<mine>/checkpoints/{'9' * 4400}/archive/link",
        404,
        words="no checkpoint '9999",
    ),
    Hostile(
        "an empty Idempotency-Key",
        "POST",
        JOBS,
        422,
        loc=("header", "idempotency-key"),
        json={},
        headers={"Idempotency-Key": ""},
    ),
    Hostile("step -3", "GET", f"{JOBS}/<mine>/checkpoints/-3/archive", 404, words="no checkpoint '-3'"),
    Hostile(
        "a file the checkpoint does not list",
        "GET",
        f"{JOBS}/<mine>/checkpoints/3/files/secret.key",
        404,
        words="no file 'secret.key'",
    ),
    Hostile(
        "NUL in a file name",
        "GET",
        f"{JOBS}/<mine>/checkpoints/3/files/config.json%00",
        404,
        words="no file 'config.json\\x00'",
    ),
    # -- Range headers on downloads
    Hostile(
        "a Range in lines, not bytes",
        "GET",
        f"{JOBS}/<mine>/checkpoints/latest/archive",
        400,
        words="Range header",
        headers={"Range": "lines=0-9"},
    ),
    Hostile(
        "a Range without a unit",
        "GET",
        f"{JOBS}/<mine>/checkpoints/3/files/config.json",
        400,
        words="Range header",
        headers={"Range": "0-9"},
    ),
    Hostile(
        "a Range past the file's end",
        "GET",
        f"{JOBS}/<mine>/checkpoints/3/files/config.json",
        416,
        words="the file has",
        headers={"Range": f"bytes={2**40}-"},
    ),
    # -- signed links: bound to their path and time, and only to their own signature
    Hostile("a non-ASCII signature", "GET", "<archive_link>é", 403, words="invalid or has expired", token=False),
    Hostile(
        "a signature of another path", "GET", "<archive_link_on_file>", 403, words="invalid or has expired", token=False
    ),
    Hostile(
        "latest's link used for best", "GET", "<archive_link_on_best>", 403, words="invalid or has expired", token=False
    ),
    Hostile(
        "a link moved to another user's job",
        "GET",
        "<archive_link_on_theirs>",
        403,
        words="invalid or has expired",
        token=False,
    ),
    Hostile("an expired link", "GET", "<expired_link>", 403, words="invalid or has expired", token=False),
    Hostile(
        "a signature without expires",
        "GET",
        f"{JOBS}/<mine>/checkpoints/latest/archive?signature=00&kid=k",
        403,
        words="invalid or has expired",
        token=False,
    ),
    Hostile(
        "expires 2**70",
        "GET",
        f"{JOBS}/<mine>/checkpoints/latest/archive?expires={2**70}&kid=k&signature=00",
        403,
        words="invalid or has expired",
        token=False,
    ),
    Hostile(
        "expires 1e999",
        "GET",
        f"{JOBS}/<mine>/checkpoints/latest/archive?expires=1e999&kid=k&signature=00",
        422,
        ("query", "expires"),
        "integer",
        token=False,
    ),
    # -- tokens
    Hostile("no token", "GET", JOBS, 401, words="bearer token", token=False),
    Hostile(
        "an unknown token",
        "GET",
        JOBS,
        401,
        words="bearer token",
        token=False,
        headers={"Authorization": "Bearer dst_not-a-real-token"},
    ),
    Hostile(
        "a Basic credential",
        "GET",
        JOBS,
        401,
        words="bearer token",
        token=False,
        headers={"Authorization": "Basic dXNlcjpwYXNz"},
    ),
    Hostile(
        "an expired token",
        "GET",
        JOBS,
        401,
        words="bearer token",
        token=False,
        headers={"Authorization": "Bearer <expired_token>"},
    ),
    Hostile(
        "a revoked token",
        "GET",
        JOBS,
        401,
        words="bearer token",
        token=False,
        headers={"Authorization": "Bearer <revoked_token>"},
    ),
    Hostile(
        "a token of Latin-1 bytes",
        "GET",
        JOBS,
        401,
        words="bearer token",
        token=False,
        headers={"Authorization": b"Bearer \xe9\xff"},
    ),
    Hostile("no token for a spec", "POST", JOBS, 401, words="bearer token", token=False, json=spec()),
    # -- a user's own webhook
    Hostile(
        "a javascript: webhook",
        "PUT",
        "/api/v1/me/webhook",
        422,
        ("body", "url"),
        "http",
        json={"url": "javascript:alert(1)"},
    ),
    Hostile(
        "a webhook of 5,000 characters",
        "PUT",
        "/api/v1/me/webhook",
        422,
        ("body", "url"),
        "2000",
        json={"url": "https://example.com/" + "a" * 5000},
    ),
    Hostile(
        "a webhook on the metadata service",
        "PUT",
        "/api/v1/me/webhook",
        422,
        ("body", "url"),
        "not a public address",
        json={"url": "http://169.254.169.254/latest/meta-data"},
        settings={"webhook_allow_private": False},
    ),
    Hostile(
        "new_secret as words",
        "PUT",
        "/api/v1/me/webhook",
        422,
        ("body", "new_secret"),
        "boolean",
        json={"url": None, "new_secret": "yes please"},
    ),
    Hostile(
        "no token for a webhook",
        "PUT",
        "/api/v1/me/webhook",
        401,
        words="bearer token",
        token=False,
        json={"url": None},
    ),
    # -- server paths outside the operator's roots (tests/service/test_path_roots.py has the rest)
    Hostile(
        "data.train is the server's /etc/passwd",
        "POST",
        JOBS,
        422,
        ("body", "data", "train"),
        "may read",
        json=spec(data={"train": "/etc/passwd"}),
    ),
    Hostile(
        "data.eval climbs out with ..",
        "POST",
        JOBS,
        422,
        ("body", "data", "eval"),
        "absolute path",
        json=spec(data={"eval": "../../../etc/passwd"}),
    ),
    Hostile(
        "data.selection in a home folder",
        "POST",
        JOBS,
        422,
        ("body", "data", "selection"),
        "absolute path",
        json=spec(data={"selection": "~/.ssh/id_rsa"}),
    ),
    Hostile(
        "teacher is a server folder", "POST", JOBS, 422, ("body", "teacher"), "may read", json=spec(teacher="/etc")
    ),
    # The kernel's file systems: /proc/1/root cannot even be followed here (realpath raised, a 500).
    Hostile(
        "teacher is /proc/1/root", "POST", JOBS, 422, ("body", "teacher"), "may read", json=spec(teacher="/proc/1/root")
    ),
    Hostile(
        "student is /proc/1/cwd",
        "POST",
        JOBS,
        422,
        ("body", "student", "model"),
        "may read",
        json=spec(student={"model": "/proc/1/cwd"}),
    ),
    Hostile(
        "data.eval under /proc/1/root",
        "POST",
        JOBS,
        422,
        ("body", "data", "eval"),
        "may read",
        json=spec(data={"eval": "/proc/1/root/etc/shadow"}),
    ),
    Hostile(
        "data.pretrain is /etc/hostname",
        "POST",
        JOBS,
        422,
        ("body", "data", "pretrain"),
        "may read",
        json=spec(method="minillm", data={"train": "builtin:demo", "pretrain": "/etc/hostname"}),
    ),
    Hostile(
        "student.model climbs out of a root",
        "POST",
        JOBS,
        422,
        ("body", "student", "model"),
        "may read",
        json=spec(student={"model": "/tmp/pytest-of-root/../../etc"}),
    ),
]


# -- the world the cases run in -----------------------------------------------------------------


def _checkpoint(job_id: str, root, secret: bool) -> None:
    """A checkpoint at step 3 on disk and in the table, as the worker's reporter records one."""
    from app.core.db import session_factory
    from app.models import Checkpoint

    directory = root / job_id / "step-000003"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"owner": SECRET if secret else "me"}))
    archive = root / job_id / "step-000003.tar"
    archive.write_bytes(f"{SECRET if secret else 'me'} archive".encode())
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    with session_factory()() as session:
        session.add(
            Checkpoint(
                job_id=job_id,
                step=3,
                path=str(directory),
                archive_path=str(archive),
                scores=None,
                archive_size=archive.stat().st_size,
                archive_sha256=digest(archive),
                files=[
                    {
                        "name": "config.json",
                        "size": (directory / "config.json").stat().st_size,
                        "sha256": digest(directory / "config.json"),
                    }
                ],
            )
        )
        session.commit()


def _token(expires_in: timedelta | None = None, revoke: bool = False) -> str:
    from app import crud
    from app.core.db import session_factory

    with session_factory()() as session:
        name = f"hostile-{uuid.uuid4().hex[:8]}"
        _user, token = crud.create_user(session, name, expires_in)
        if revoke:
            assert crud.revoke_token(session, crud.tokens_of(session, name)[0].id)
    return token


@pytest.fixture(scope="module")
def world(client, tmp_path_factory) -> dict:
    from app.core.security import signed_url

    auth, other = make_user(), make_user()
    jobs = {}
    for key, user in (("mine", auth), ("theirs", other)):
        response = client.post(JOBS, json=spec(name=f"{SECRET}-job" if user is other else "mine"), headers=user)
        assert response.status_code == 201, response.text
        jobs[key] = response.json()["id"]
        assert client.post(f"{JOBS}/{jobs[key]}/cancel", headers=user).status_code == 200  # nothing left queued
        _checkpoint(jobs[key], tmp_path_factory.mktemp("checkpoints"), secret=user is other)
    # their checkpoint is there for its owner: the 404s the cases expect are not for want of one
    assert SECRET in client.get(f"{JOBS}/{jobs['theirs']}/checkpoints/latest/archive", headers=other).text
    their_dataset = client.post(DATASETS, params={"name": f"{SECRET}.jsonl"}, content=GOOD_LINE, headers=other)
    assert their_dataset.status_code == 201, their_dataset.text
    link = client.post(f"{JOBS}/{jobs['mine']}/checkpoints/latest/archive/link", headers=auth).json()["url"]
    assert client.get(link).status_code == 200  # the link works as given; the cases break it one way each
    path, query = link.split("?")
    return {
        "auth": auth,
        "other": other,
        **jobs,
        "their_dataset": their_dataset.json()["id"],
        "archive_link": link,
        "archive_link_on_file": f"{path.replace('/archive', '/files/config.json')}?{query}",
        "archive_link_on_best": link.replace("/latest/", "/best/"),
        "archive_link_on_theirs": link.replace(jobs["mine"], jobs["theirs"]),
        "expired_link": signed_url(path, int(parse_qs(query)["tid"][0]), seconds=-60)[0],
        "expired_token": _token(expires_in=timedelta(seconds=-1)),
        "revoked_token": _token(revoke=True),
    }


def fill(value, world: dict):
    """`value` with every `<name>` replaced by world[name], in text, bytes and nested JSON."""
    if isinstance(value, str):
        for name, text in world.items():
            if isinstance(text, str):
                value = value.replace(f"<{name}>", text)
        return value
    if isinstance(value, dict):
        return {k: fill(v, world) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, world) for v in value]
    return value


def stored(session) -> dict:
    """What a refused request must not have added: jobs, datasets, and files in the datasets folder."""
    from app.core.config import get_settings
    from app.models import Dataset, Job

    folder = get_settings().resolved_artifacts_dir / "datasets"
    return {
        "jobs": session.scalar(select(func.count()).select_from(Job)),
        "datasets": session.scalar(select(func.count()).select_from(Dataset)),
        "files": sorted(p.name for p in folder.iterdir()) if folder.exists() else [],
    }


# -- the tests ----------------------------------------------------------------------------------


def test_the_base_spec_is_accepted(client):
    """Each spec case differs from this one in one field, so that field is why it is refused."""
    response = client.post(JOBS, json=spec(name="base"), headers=(user := make_user()))
    assert response.status_code == 201, response.text
    assert client.post(f"{JOBS}/{response.json()['id']}/cancel", headers=user).status_code == 200


def test_case_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]


@pytest.mark.parametrize("method,route", [("GET", r) for r in OWN_ROUTES] + [("POST", r) for r in LINK_ROUTES])
def test_another_users_job_answers_as_a_missing_one(client, world, method, route):
    missing = "job-0000000000000000"
    theirs = client.request(method, f"{JOBS}/{world['theirs']}{route}", headers=world["auth"])
    nothing = client.request(method, f"{JOBS}/{missing}{route}", headers=world["auth"])
    assert theirs.status_code == nothing.status_code == 404
    assert theirs.headers.keys() == nothing.headers.keys()
    assert theirs.text.replace(world["theirs"], missing) == nothing.text


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_request_is_refused_naming_the_field(client, world, case: Hostile, monkeypatch):
    from app.core.config import get_settings
    from app.core.db import session_factory

    for name, value in case.settings.items():
        monkeypatch.setattr(get_settings(), name, value)
    headers = {**(world["auth"] if case.token else {}), **fill(case.headers, world)}
    with session_factory()() as session:
        before = stored(session)

    response = client.request(
        case.method, fill(case.url, world), headers=headers, json=fill(case.json, world), content=case.content
    )

    assert response.status_code == case.status, response.text[:2000]
    error = ErrorOut.model_validate(response.json())
    words = fill(case.words, world)
    if case.loc is not None:
        errors = [e for e in error.detail if tuple(e.loc) == case.loc]
        assert errors, f"no error at {case.loc}: {error.detail}"
        assert any(words.lower() in e.msg.lower() for e in errors), errors
    else:
        assert words in error.message and [(e.loc, e.msg) for e in error.detail] == [([], error.message)], error
    assert SECRET not in response.text  # 0 reads of the other user's job, checkpoint or dataset
    with session_factory()() as session:
        after = stored(session)
    assert after == before  # nothing stored: no job, no dataset row, no .partial or other file


def test_a_signed_link_stops_working_once_the_token_that_made_it_is_revoked(client, world):
    """A link outlives no token: one made with a token that was revoked since is refused (it worked
    for 24 hours after the revocation before), while a link of another of the user's tokens goes on."""
    from app import crud
    from app.core.db import session_factory

    with session_factory()() as session:
        user = crud.user_for_token(session, world["auth"]["Authorization"].removeprefix("Bearer "))
        second = crud.create_token(session, user)
    made_by_second = {"Authorization": f"Bearer {second}"}
    link = client.post(f"{JOBS}/{world['mine']}/checkpoints/latest/archive/link", headers=made_by_second).json()["url"]
    assert client.get(link).status_code == 200
    with session_factory()() as session:
        assert crud.revoke_token(session, crud.live_token_id(session, second))
    refused = client.get(link)
    assert refused.status_code == 403 and "invalid or has expired" in refused.json()["message"]
    assert client.get(link.replace(f"tid={parse_qs(link.split('?')[1])['tid'][0]}", "tid=1")).status_code == 403
    assert client.get(world["archive_link"]).status_code == 200


def test_an_oversize_spec_sent_without_a_length_is_413(client, world):
    """Chunked, with no Content-Length to refuse it by: counted as it arrives."""
    body = json.dumps(spec(name="x" * 2_000_000)).encode()
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    response = client.post(JOBS, content=chunks, headers={**world["auth"], **JSON})
    assert response.status_code == 413, response.text[:500]
    assert "over 1048576 bytes" in ErrorOut.model_validate(response.json()).message


def test_a_dataset_may_be_larger_than_a_spec(client):
    """Uploads stream to disk under their own limit, not the 1 MiB cap on other bodies."""
    body = GOOD_LINE * (2 * 1024 * 1024 // len(GOOD_LINE))
    response = client.post(DATASETS, params={"name": "two-mib.jsonl"}, content=body, headers=make_user())
    assert response.status_code == 201, response.text
    assert response.json()["size_bytes"] == len(body) > 1024 * 1024

"""Download links name the key that signed them: rotating keys keeps links already issued working,
a retired key's links are refused, and a link cannot be moved to another key."""

import hashlib
import os
import stat
import subprocess
import sys
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from helpers import queued_job
from pydantic import ValidationError

from app.core import signing_keys
from app.core.config import Settings, get_settings

JOBS = "/api/v1/jobs"


def distill(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


def kid_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["kid"][0]


def with_kid(url: str, kid: str | None) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items() if k != "kid"}
    return f"{parts.path}?{urlencode({**query, **({'kid': kid} if kid is not None else {})})}"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A job with one checkpoint archive on disk, made directly in the database (no worker needed):
    (its archive path, bearer headers of its owner, the archive's bytes)."""
    from app import crud, job_status
    from app.core.db import session_factory
    from app.models import Checkpoint

    content = b"a checkpoint archive"
    folder = tmp_path_factory.mktemp("checkpoint")
    (folder / "model.tar").write_bytes(content)
    with session_factory()() as session:
        user, token = crud.create_user(session, f"signer-{os.getpid()}")
        job = queued_job(session, user, "signed")
        job_status.request_cancel(session, job.id)  # ended: never sent to a worker
        session.add(
            Checkpoint(
                job_id=job.id,
                step=1,
                path=str(folder),
                archive_path=str(folder / "model.tar"),
                archive_size=len(content),
                archive_sha256=hashlib.sha256(content).hexdigest(),
                files=[],
            )
        )
        session.commit()
        return f"{JOBS}/{job.id}/checkpoints/1/archive", {"Authorization": f"Bearer {token}"}, content


def new_link(client, archive) -> str:
    path, auth, _ = archive
    response = client.post(f"{path}/link", headers=auth)
    assert response.status_code == 200, response.text
    return response.json()["url"]


def listed(*env) -> list[list[str]]:
    result = distill("keys", "list")
    assert result.returncode == 0, result.stderr
    return [line.split() for line in result.stdout.strip().splitlines()[1:]]


def test_links_survive_a_rotation_until_their_key_is_retired(client, archive):
    _, _, content = archive
    before = new_link(client, archive)
    assert client.get(before).content == content

    rotated = distill("keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_kid = rotated.stdout.strip()
    after = new_link(client, archive)  # the running API signs with the new key at once
    assert kid_of(after) == new_kid != kid_of(before)
    assert client.get(before).content == content  # issued before the rotation: still good
    assert client.get(after).content == content

    rows = listed()
    assert rows[0][0] == new_kid and rows[0][-1] == "yes"  # newest first, and it signs
    assert kid_of(before) in [row[0] for row in rows[1:]] and all(row[-1] != "yes" for row in rows[1:])

    refused = distill("keys", "retire", new_kid)
    assert refused.returncode != 0 and "rotate" in refused.stderr  # the signing key: rotate first
    assert distill("keys", "retire", "no-such-key").returncode != 0

    retired = distill("keys", "retire", kid_of(before))
    assert retired.returncode == 0, retired.stderr
    assert client.get(before).status_code == 403  # at once, without restarting the API
    assert client.get(after).content == content
    assert kid_of(before) not in [row[0] for row in listed()]


def test_a_link_cannot_change_or_drop_its_key(client, archive):
    distill("keys", "rotate")  # at least two accepted keys
    link = new_link(client, archive)
    other = next(key.kid for key in signing_keys.all_keys() if key.kid != kid_of(link))
    assert client.get(link).status_code == 200
    for kid in (other, "no-such-key", "../secret_key", "", None):
        assert client.get(with_kid(link, kid)).status_code == 403, kid


def test_key_files_are_private_from_birth(client, archive):
    new_link(client, archive)
    folder = get_settings().data_dir / "keys"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = list(folder.iterdir())
    assert files and all(p.suffix == ".key" for p in files)  # no temporary files left behind
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


def test_keys_from_the_setting(client, archive, monkeypatch):
    _, _, content = archive
    use = lambda value: monkeypatch.setattr(signing_keys, "get_settings", lambda: Settings(secret_key=value))  # noqa: E731
    use("old:first-secret")
    old = new_link(client, archive)
    assert kid_of(old) == "old" and client.get(old).content == content
    use("new:second-secret, old:first-secret")  # rotated: the first entry signs, both are accepted
    new = new_link(client, archive)
    assert kid_of(new) == "new" and client.get(new).content == content and client.get(old).content == content
    use("new:second-secret")  # retired
    assert client.get(old).status_code == 403 and client.get(new).content == content
    use("just-a-secret")  # a setting from before key ids: one key, id "default"
    assert kid_of(new_link(client, archive)) == "default"

    assert Settings(secret_key="a:x, b").secret_key == [("a", "x"), ("default", "b")]
    for bad in ("a:x,a:y", "a/b:x", "a:", "a,b"):  # a repeated id, a bad id, no secret, two "default"s
        with pytest.raises(ValidationError, match="secret_key"):
            Settings(secret_key=bad)

    for command in (["keys", "rotate"], ["keys", "retire", "old"]):
        result = distill(*command, DISTILL_SECRET_KEY="new:second-secret,old:first-secret")
        assert result.returncode != 0 and "DISTILL_SECRET_KEY" in result.stderr
    result = distill("keys", "list", DISTILL_SECRET_KEY="new:second-secret,old:first-secret")
    assert [line.split() for line in result.stdout.splitlines()[1:]] == [["new", "-", "yes"], ["old", "-"]]
    assert "second-secret" not in result.stdout

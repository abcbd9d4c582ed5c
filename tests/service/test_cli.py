import os
import subprocess
import sys

from app.core.config import Settings
from worker.engine.paths import PROJECT_ROOT


def test_users_create_prints_a_token_that_signs_in(client):
    result = subprocess.run([sys.executable, "-m", "app.cli", "users", "create", "carol"], capture_output=True,
                            text=True, env=os.environ.copy(), timeout=120)  # fmt: skip
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
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=120)  # fmt: skip


def test_tokens_are_listed_revoked_and_expire(client):
    from datetime import timedelta

    from app import crud
    from app.core.db import session_factory
    from app.models import User
    from sqlalchemy import select

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

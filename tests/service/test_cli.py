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

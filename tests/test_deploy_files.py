"""The deployment files: no secret in them, services that restart and report health, images that
do not run as root. (Building the images needs a registry; these read the files as compose and
Docker would.)"""

import re

import yaml

from worker.engine.paths import PROJECT_ROOT

COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_compose_takes_every_secret_from_the_env_file():
    text = (PROJECT_ROOT / "docker-compose.yml").read_text()
    settings = COMPOSE["x-settings"]
    assert "${POSTGRES_PASSWORD:?" in settings["DISTILL_DATABASE_URL"]
    assert "${REDIS_PASSWORD:?" in settings["DISTILL_BROKER_URL"]  # Redis with a password
    assert settings["DISTILL_SECRET_KEY"].startswith("${DISTILL_SECRET_KEY:?")  # the same signing key on every replica
    assert "--requirepass" in SERVICES["redis"]["command"]
    assert SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert not re.search(r"://\w+:(?!\$\{)[^@]+@", text)  # no password written into a URL
    example = (PROJECT_ROOT / "deploy.env.example").read_text()
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "DISTILL_SECRET_KEY"} <= set(re.findall(r"^(\w+)=", example, re.M))
    assert ".env" in (PROJECT_ROOT / ".gitignore").read_text().split()


def test_compose_services_restart_report_health_and_keep_state_on_volumes():
    for name, service in SERVICES.items():
        assert service.get("restart") == "unless-stopped", name
    for name in ("postgres", "redis", "api"):
        assert "healthcheck" in SERVICES[name], name
    assert any(v.endswith(":/data") for v in SERVICES["api"]["volumes"])  # the signing key and token survive redeploys
    assert any(v.endswith(":/artifacts") for v in SERVICES["api"]["volumes"])
    # Hub downloads land on the workers' cache volume, not in the container's layer: kept across redeploys.
    assert any(v.endswith(":/data/cache") for v in SERVICES["worker"]["volumes"])
    assert re.search(r"^\s+HF_HOME=/data/cache/huggingface\b", (PROJECT_ROOT / "Dockerfile").read_text(), re.M)
    # Jobs with accelerator auto find the GPU workers by themselves (no setting routes them).
    assert not any("AUTO_ACCELERATOR" in key for key in COMPOSE["x-settings"])


def test_both_images_run_as_an_unprivileged_user():
    stages = re.split(r"^FROM ", (PROJECT_ROOT / "Dockerfile").read_text(), flags=re.M)[1:]
    finals = {stage.split()[2]: stage for stage in stages if " AS " in stage.splitlines()[0]}
    for target in ("api", "worker"):
        users = re.findall(r"^USER (\S+)", finals[target], re.M)
        assert users and users[-1] not in ("root", "0"), target


def test_compose_confines_spec_paths_to_roots_the_workers_mount():
    from app.core.config import Settings

    settings = {k: v for k, v in COMPOSE["x-settings"].items() if "${" not in v}
    # The settings load as the services would load them: roots apart from the artifacts they share.
    loaded = Settings(**{k.removeprefix("DISTILL_").lower(): v for k, v in settings.items()}, data_dir="/data")
    assert loaded.model_roots and loaded.data_roots and loaded.api_sees_worker_files is False
    mounts = {v.split(":")[1] for v in SERVICES["worker"]["volumes"]}
    assert {str(p) for p in loaded.model_roots + loaded.data_roots} <= mounts

"""How a worker launches a job's training process, and how it describes one that died."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import submit, tiny_spec
from sqlalchemy import text, update

from app.core.config import Settings, get_settings
from app.core.db import session_factory
from app.models import Job
from worker.device_leases import Inventory, inventory
from worker.node_group import HostfileError, read_hostfile, write_rank_environment
from worker.supervisor import child_command, child_environment, describe_exit


def test_one_device_runs_one_process():
    cmd = child_command("job-1", 2, {"resources": {"devices": 1}}, Settings())
    assert cmd == [sys.executable, "-m", "worker.job_process", "job-1", "--attempt", "2"]


def test_several_devices_run_under_the_deepspeed_launcher():
    cmd = child_command("job-1", 1, {"resources": {"devices": 4}}, Settings(), devices=[4, 5, 6, 7])
    assert Path(cmd[0]).name == "deepspeed" and cmd[cmd.index("--include") + 1] == "localhost:4,5,6,7"
    assert cmd[cmd.index("--module") + 1 :] == ["worker.job_process", "job-1", "--attempt", "1"]


def test_a_job_across_the_node_group_names_its_machines_size_and_rendezvous(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("gpu-a slots=8\ngpu-b slots=8  # rack 2\n\ngpu-c slots=8\n")
    settings = Settings(hostfile=hosts, worker_gpus=8)
    # The first machine's worker runs jobs of its own GPUs, and of 2 or 3 whole machines.
    assert inventory(settings).queues == [f"{kind}-{n}" for kind in ("gpu", "auto") for n in [*range(1, 9), 16, 24]]
    cmd = child_command("job-1", 1, {"resources": {"devices": 16}}, settings, devices=list(range(8)), master_port=29123)

    def option(name: str) -> str:
        return cmd[cmd.index(name) + 1]

    assert option("--hostfile") == str(hosts) and option("--num_nodes") == "2" and option("--num_gpus") == "8"
    assert option("--master_addr") == "gpu-a" and option("--master_port") == "29123" and "--include" not in cmd


def test_a_hostfile_that_cannot_describe_a_group_is_refused_naming_the_line(tmp_path):
    hosts = tmp_path / "hosts"
    for content, words in [
        ("gpu-a slots=8\ngpu-b slots=4\n", "same slots"),
        ("gpu-a slots=8\ngpu-b\n", "line 2"),
        ("# nobody\n", "no hosts"),
    ]:
        hosts.write_text(content)
        with pytest.raises(HostfileError, match=words):
            read_hostfile(hosts)


def test_ranks_across_machines_get_the_settings_they_need_and_no_others(tmp_path):
    env = {
        "DISTILL_DATABASE_URL": "postgresql+psycopg://distill:pw@db/distill",
        "DISTILL_ARTIFACTS_DIR": "/srv/artifacts",
        "DISTILL_MODEL_ROOTS": "/srv/models:/mnt/m",
        "AWS_SECRET_ACCESS_KEY": "s3-secret",
        "HF_HOME": "/data/cache/hf",
        "PGOPTIONS": "-c idle_in_transaction_session_timeout=60000",
        "DISTILL_SECRET_KEY": "k1:signing-secret",
        "DISTILL_BROKER_URL": "redis://:pw@redis/0",
        "DISTILL_WEBHOOK_CA_FILE": "/etc/ca.pem",
        "HOME": "/root",
    }
    path = write_rank_environment(env, tmp_path / "attempt-1.env")
    written = dict(line.split("=", 1) for line in path.read_text().splitlines())
    assert written == {
        k: env[k]
        for k in (
            "DISTILL_DATABASE_URL",
            "DISTILL_ARTIFACTS_DIR",
            "DISTILL_MODEL_ROOTS",
            "AWS_SECRET_ACCESS_KEY",
            "HF_HOME",
            "PGOPTIONS",
        )
    }
    assert path.stat().st_mode & 0o777 == 0o600


def test_exit_descriptions(tmp_path):
    log = tmp_path / "attempt-1.log"
    log.write_text("loading\nRuntimeError: boom\n")
    killed = describe_exit(-signal.SIGKILL, log)
    assert killed["code"] == "ProcessExited" and "SIGKILL" in killed["message"] and "out-of-memory" in killed["message"]
    assert (
        "exited with code 3" in describe_exit(3, log)["message"]
        and "RuntimeError: boom" in describe_exit(3, log)["message"]
    )


def test_the_api_and_celery_processes_never_import_torch():
    """torch, CUDA and DeepSpeed live only in the training child (fork safety, memory): not in the
    API (app.main, with the checks it runs on a submitted spec and an uploaded dataset), the CLI,
    the Celery supervisor or the reaper. transformers would bring torch with it."""
    import subprocess

    code = """
import sys, app.main
# The API queues work by task name: it imports none of the worker's own modules, only the engine's
# spec model and its torch-free checks.
assert not [m for m in sys.modules if m.startswith("worker.") and m.split(".")[1] != "engine"], sorted(sys.modules)
import app.cli, worker.tasks, app.reaper
from worker.engine.data import read_records
from worker.engine.preflight import preflight
from worker.engine.spec import parse_spec
demo = {"teacher": "builtin:smollm2-135m-instruct", "student": {"model": "builtin:tiny-student"}}
assert preflight(parse_spec(demo)) == []
assert preflight(parse_spec({"student": {"model": "/no/such/dir"}}))
assert read_records("builtin:demo")
sys.exit(2 if "torch" in sys.modules or "transformers" in sys.modules else 0)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


LOCK_THE_ROW = """
import sys, time
from sqlalchemy import select
from app.core.db import session_factory
from app.models import Job
session = session_factory()()
session.scalar(select(Job.id).where(Job.id == sys.argv[1]).with_for_update())
print("locked", flush=True)
time.sleep(600)  # a training process stopped or hung inside its transaction
"""


def test_a_training_process_stuck_in_a_transaction_does_not_block_the_job_row(client, auth, dataset):
    """The supervisor's heartbeat needs the job's row; a child that holds the row's lock and stops
    must not hold it for longer than half the heartbeat timeout (the server closes its session)."""
    job_id = submit(client, auth, tiny_spec(dataset))
    settings = get_settings()
    env = child_environment(None, Inventory("cpu", 1), settings)
    child = subprocess.Popen([sys.executable, "-c", LOCK_THE_ROW, job_id], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "locked"
        os.kill(child.pid, signal.SIGSTOP)
        started = time.monotonic()
        with session_factory()() as session:
            session.execute(text("SET LOCAL lock_timeout = '30s'"))  # fails, rather than hangs, without the fix
            session.execute(update(Job).where(Job.id == job_id).values(eta_seconds=1))  # waits for the lock
            session.commit()
        waited = time.monotonic() - started
        assert waited < settings.heartbeat_timeout_seconds / 2 + 5, waited
    finally:
        child.kill()
        child.wait()


def test_the_training_process_gets_the_operators_engine_settings_and_bad_ones_are_refused():
    from pydantic import ValidationError

    settings = get_settings().model_copy(update={"hub_max_gb": 7.5, "trackers": "mlflow,wandb"})
    env = child_environment(None, Inventory("cpu", 1), settings)
    assert env["DISTILL_HUB_MAX_GB"] == "7.5" and env["DISTILL_TRACKERS"] == "mlflow,wandb"
    with pytest.raises(ValidationError, match="trackers"):
        Settings(trackers="neptune")

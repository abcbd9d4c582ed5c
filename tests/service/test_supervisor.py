"""How a worker launches a job's training process, and how it describes one that died."""

import signal
import sys
from pathlib import Path

from app.core.config import Settings
from worker.supervisor import child_command, describe_exit


def test_one_device_runs_one_process():
    cmd = child_command("job-1", 2, {"resources": {"devices": 1}}, Settings())
    assert cmd == [sys.executable, "-m", "worker.job_process", "job-1", "--attempt", "2"]


def test_several_devices_run_under_the_deepspeed_launcher():
    cmd = child_command("job-1", 1, {"resources": {"devices": 4}}, Settings())
    assert Path(cmd[0]).name == "deepspeed" and cmd[cmd.index("--num_gpus") + 1] == "4"
    assert cmd[cmd.index("--module") + 1 :] == ["worker.job_process", "job-1", "--attempt", "1"]


def test_a_hostfile_spreads_ranks_over_machines(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("gpu-a slots=8\ngpu-b slots=8\n")
    cmd = child_command("job-1", 1, {"resources": {"devices": 16}}, Settings(hostfile=hosts))
    assert cmd[cmd.index("--hostfile") + 1] == str(hosts) and "--num_gpus" not in cmd


def test_exit_descriptions(tmp_path):
    log = tmp_path / "attempt-1.log"
    log.write_text("loading\nRuntimeError: boom\n")
    killed = describe_exit(-signal.SIGKILL, log)
    assert killed["code"] == "ProcessExited" and "SIGKILL" in killed["message"] and "out-of-memory" in killed["message"]
    assert "exited with code 3" in describe_exit(3, log)["message"] and "RuntimeError: boom" in describe_exit(3, log)["message"]


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
assert preflight(parse_spec({"teacher": "builtin:smollm2-135m-instruct", "student": {"model": "builtin:tiny-student"}})) == []
assert preflight(parse_spec({"student": {"model": "/no/such/dir"}}))
assert read_records("builtin:demo")
sys.exit(2 if "torch" in sys.modules or "transformers" in sys.modules else 0)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

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


def test_the_celery_process_never_imports_torch():
    """torch, CUDA and DeepSpeed live only in the training child (fork safety, memory)."""
    import subprocess

    code = "import sys, app.cli, worker.tasks, worker.reaper; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

"""A job across a node group, on two simulated hosts: the loopback addresses 127.0.0.2 and
127.0.0.3, each reached through an ssh server this test starts, as DeepSpeed's pdsh launcher
reaches real machines. The worker runs on the first; the job's two ranks start one on each host,
over ssh, with nothing of the worker's environment but the settings file it exports, and train the
job to `succeeded`. (`scripts/ensure-node-group-tools.sh`, run by `make test`, installs pdsh and
the ssh server.)"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import Worker, job, submit, tiny_spec, wait_for, wait_status

from worker.engine.launch import free_port

HOSTS = ("127.0.0.2", "127.0.0.3")
pytestmark = pytest.mark.skipif(
    not (shutil.which("pdsh") and Path("/usr/sbin/sshd").exists()),
    reason="needs pdsh and an ssh server: scripts/ensure-node-group-tools.sh",
)


@pytest.fixture(scope="module")
def node_group(tmp_path_factory):
    """An ssh server on both hosts, a client set up to reach them without a password (an `ssh` first
    in PATH that reads this test's client config), and their hostfile."""
    d = tmp_path_factory.mktemp("node-group")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\n" + "".join(f"ListenAddress {h}\n" for h in HOSTS) + f"HostKey {d}/host_key\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile {d}/sshd.pid\n"
    )
    (d / "ssh_config").write_text(
        f"Host {' '.join(HOSTS)}\n  Port {port}\n  IdentityFile {d}/client_key\n  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
    )
    (d / "bin").mkdir()
    (d / "bin" / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {d}/ssh_config "$@"\n')
    (d / "bin" / "ssh").chmod(0o755)
    (d / "hostfile").write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    Path("/run/sshd").mkdir(exist_ok=True)  # the server's privilege-separation folder
    sshd = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")], stderr=(d / "sshd.log").open("w")
    )

    def reachable() -> bool:
        return all(
            subprocess.run([str(d / "bin" / "ssh"), "-o", "BatchMode=yes", h, "true"]).returncode == 0 for h in HOSTS
        )

    try:
        wait_for(reachable, timeout=30, what="the ssh server on both hosts")
        yield d
    finally:
        sshd.terminate()
        sshd.wait()


def rank_environments(job_id: str) -> list[dict[str, str]]:
    """The environments of a job's ranks under the DeepSpeed launcher, wherever pdsh started them."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            ranked = any(a.startswith(b"--local_rank=") for a in argv)  # not the launcher, whose argv names them too
            if ranked and b"worker.job_process" in argv and job_id.encode() in argv:
                pairs = (v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
                found.append({k.decode(): v.decode(errors="replace") for k, v in pairs})
        except OSError:  # ended meanwhile
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("no_leftover_jobs")  # else this worker would first take earlier tests' queued jobs
def test_a_two_node_job_trains_to_succeeded_with_one_rank_on_each_host(client, auth, dataset, node_group, tmp_path):
    worker = Worker(
        tmp_path / "worker.log",
        DISTILL_HOSTFILE=str(node_group / "hostfile"),
        DISTILL_WORKER_CPU_PROCESSES="1",
        DISTILL_SECRET_KEY="k1:not-for-ranks",
        PATH=f"{node_group / 'bin'}:{os.environ['PATH']}",
    ).start()
    try:
        spec = tiny_spec(
            dataset,
            method="kd",
            resources={"accelerator": "cpu", "devices": 2},
            training={"steps": 4},
            eval={"every_steps": 0},
            checkpoints={"every_steps": 2, "keep": 1},
        )
        job_id = submit(client, auth, spec)
        assert job(client, auth, job_id)["queue"] == "cpu-2"  # 2 machines of 1 slot: a size only the group runs
        # Each rank, started over ssh, has the settings it needs and not the API's signing keys.
        environs = wait_for(
            lambda: len(e := rank_environments(job_id)) == 2 and e,
            timeout=240,
            interval=0.2,
            what="a rank on each host",
        )
        for environ in environs:
            assert environ["DISTILL_DATABASE_URL"] == os.environ["DISTILL_DATABASE_URL"]
            assert "DISTILL_SECRET_KEY" not in environ and "DISTILL_BROKER_URL" not in environ
        done = wait_status(client, auth, job_id, {"succeeded", "failed"}, timeout=420)
        assert done["status"] == "succeeded", done["error"]
        assert done["placement"]["hosts"] == list(HOSTS) and done["placement"]["devices"] == [0]
        folder = Path(os.environ["DISTILL_ARTIFACTS_DIR"]) / "jobs" / job_id
        log = (folder / "attempt-1.log").read_text()
        # pdsh prefixes each line with the host it came from: a rank ran, and trained, on each.
        for host in HOSTS:
            assert f"{host}: " in log, log[-3000:]
        # The ranks' settings are gone with the attempt (the supervisor settles after the job's outcome).
        wait_for(lambda: not (folder / "attempt-1.env").exists(), timeout=60, what="the ranks' settings file to go")
        assert [c["step"] for c in client.get(f"/api/v1/jobs/{job_id}/checkpoints", headers=auth).json()] == [4]
    finally:
        worker.stop()

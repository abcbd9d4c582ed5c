"""Devices allocated per job: where `auto` jobs go, leases of a worker's devices in the real database,
the launcher's device options, and a real worker that declares 4 GPUs running two 2-device jobs at
once on disjoint devices (on this CPU: the declared GPUs are ordinals the launcher hands out, and
the `auto` jobs train on the CPU because no GPU is visible)."""

import sys
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import Worker, job, rank_processes, submit, tiny_spec, two_device_spec, wait_for, wait_status
from sqlalchemy import select
from test_queues import cancel, register, served, unregister

from app.core.broker import queue_for
from app.core.config import Settings
from app.core.db import session_factory
from app.models import DeviceLease
from worker import device_leases
from worker.device_leases import Inventory, inventory
from worker.supervisor import child_command, child_environment

JOBS = "/api/v1/jobs"
LIVENESS = timedelta(seconds=60)


def test_auto_goes_to_a_served_gpu_queue_else_to_any_worker():
    auto = {"resources": {"accelerator": "auto", "devices": 2}}
    assert queue_for(auto, {"gpu-1", "gpu-2", "auto-2"}) == "gpu-2"
    assert queue_for(auto, {"gpu-1", "cpu-2", "auto-2"}) == "auto-2"  # no GPU worker takes 2 devices
    assert queue_for({"resources": {"accelerator": "cpu", "devices": 2}}, {"gpu-2"}) == "cpu-2"
    assert queue_for({"resources": {"accelerator": "gpu"}}, set()) == "gpu-1"


def test_a_worker_serves_its_devices_sizes_and_auto():
    assert inventory(Settings(worker_gpus=4)) == Inventory("gpu", 4)
    assert Inventory("gpu", 2).queues == ["gpu-1", "gpu-2", "auto-1", "auto-2"]
    assert inventory(Settings(worker_gpus=0, worker_cpu_processes=3)).queues == [
        "cpu-1",
        "cpu-2",
        "cpu-3",
        "auto-1",
        "auto-2",
        "auto-3",
    ]


def test_the_launcher_gets_the_leased_devices():
    spec = {"resources": {"devices": 2}}
    cmd = child_command("job-1", 1, spec, Settings(), devices=[2, 3])
    assert cmd[cmd.index("--include") + 1] == "localhost:2,3" and "--num_gpus" not in cmd
    assert (
        child_environment([2, 3], Inventory("gpu", 4), Settings())["LOCAL_SIZE"] == "4"
    )  # the launcher checks ordinals against it
    one = child_environment([3], Inventory("gpu", 4), Settings())
    assert one["CUDA_VISIBLE_DEVICES"] == "3" and child_command("job-1", 1, {}, Settings(), [3])[:3] == [
        sys.executable,
        "-m",
        "worker.job_process",
    ]
    assert (
        child_environment([0], Inventory("cpu", 2), Settings())["CUDA_VISIBLE_DEVICES"] == ""
    )  # a CPU worker's job sees no GPU


def leased(job_id: str) -> list[int]:
    with session_factory()() as session:
        return sorted(session.scalars(select(DeviceLease.device).where(DeviceLease.job_id == job_id)))


def test_leases_are_disjoint_and_stale_ones_are_taken_back(client, auth, dataset):
    jobs = [
        submit(client, auth, tiny_spec(dataset, method="kd", resources={"accelerator": "gpu", "devices": 9}))
        for _ in range(4)
    ]
    four = Inventory("gpu", 4)
    register("lease-box:1", ["gpu-2"])
    register("lease-box:2", ["gpu-2"])
    Session = session_factory()
    try:
        with Session() as session:
            assert device_leases.acquire(session, jobs[0], 2, four, "lease-box:1", LIVENESS) == [0, 1]
            assert device_leases.acquire(session, jobs[1], 1, four, "lease-box:2", LIVENESS) == [
                2
            ]  # another worker, same host
            assert (
                device_leases.acquire(session, jobs[2], 2, four, "lease-box:1", LIVENESS) is None
            )  # only device 3 is free
            device_leases.release(session, jobs[0], "lease-box:1")
            assert device_leases.acquire(session, jobs[2], 2, four, "lease-box:1", LIVENESS) == [0, 1]
            # A worker gone without releasing (its registration removed, or too old): its devices are free again.
            unregister("lease-box:2")
            assert device_leases.acquire(session, jobs[3], 2, four, "lease-box:1", LIVENESS) == [2, 3]
        cancel(client, auth, jobs[2])  # a job that ended: its leases are stale too
        with Session() as session:
            assert device_leases.acquire(session, jobs[1], 2, four, "lease-box:1", LIVENESS) == [0, 1]
            held = session.execute(
                select(DeviceLease.job_id, DeviceLease.device).where(DeviceLease.host == device_leases.host())
            )
            assert set(held) == {(jobs[1], 0), (jobs[1], 1), (jobs[3], 2), (jobs[3], 3)}
    finally:
        with Session() as session:
            for job_id in jobs:
                device_leases.release(session, job_id, "lease-box:1")
        cancel(client, auth, *(j for j in jobs if job(client, auth, j)["status"] == "queued"))
        unregister("lease-box:1")


def visible_devices(job_id: str) -> set[str]:
    """CUDA_VISIBLE_DEVICES of the job's ranks now."""
    seen = set()
    for pid in rank_processes(job_id).values():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        seen |= {e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"CUDA_VISIBLE_DEVICES=")}
    return seen


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("no_leftover_jobs")  # else this worker would first take earlier tests' queued jobs
def test_a_worker_with_four_gpus_runs_two_two_device_jobs_on_disjoint_devices(client, auth, dataset, tmp_path):
    worker = Worker(tmp_path / "worker.log", DISTILL_WORKER_GPUS="4").start()
    try:
        wait_for(lambda: "gpu-2" in served(), timeout=60, what="the worker to register")
        first, second = (
            submit(client, auth, two_device_spec(dataset)),
            submit(client, auth, two_device_spec(dataset, 400)),
        )
        # `auto` jobs, and a live worker declares GPUs: they go to its queue.
        assert job(client, auth, first)["queue"] == job(client, auth, second)["queue"] == "gpu-2"

        # Both run at once, each rank seeing only its job's devices, as the launcher's --include gave them.
        sets = wait_for(
            lambda: (a := visible_devices(first)) and (b := visible_devices(second)) and (a, b),
            timeout=240,
            interval=0.2,
            what="both jobs' ranks",
        )
        assert len(sets[0]) == len(sets[1]) == 1, sets  # every rank of a job sees the same devices
        devices = [set(map(int, s.pop().split(","))) for s in sets]
        assert devices[0] | devices[1] == {0, 1, 2, 3} and not devices[0] & devices[1]
        assert [set(leased(first)), set(leased(second))] == devices
        assert job(client, auth, second)["placement"]["devices"] == sorted(devices[1])

        cancel(client, auth, second)  # a cancelled job frees its devices
        assert wait_status(client, auth, second, {"cancelled"}, timeout=120)["status"] == "cancelled"
        wait_for(lambda: leased(second) == [], timeout=30, what="the cancelled job's devices to be released")
        done = wait_status(client, auth, first, {"succeeded", "failed"}, timeout=300)
        assert done["status"] == "succeeded", done["error"]
        assert done["placement"]["kind"] == "gpu" and done["placement"]["devices"] == sorted(devices[0])
        wait_for(lambda: leased(first) == [], timeout=30, what="a finished job's devices to be released")

        # A failed one too: a job for a GPU, on this machine that has none, fails at start-up.
        failing = submit(client, auth, tiny_spec(dataset, method="kd", resources={"accelerator": "gpu", "devices": 1}))
        failed = wait_status(client, auth, failing, {"succeeded", "failed"}, timeout=180)
        assert failed["status"] == "failed" and "no GPU is visible" in failed["error"]["message"]
        assert len(failed["placement"]["devices"]) == 1
        wait_for(lambda: leased(failing) == [], timeout=30, what="a failed job's devices to be released")
    finally:
        worker.stop()
        print((tmp_path / "worker.log").read_text()[-3000:], file=sys.stderr)

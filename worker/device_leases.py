"""Which devices a worker hands out, and which job holds which device (the `device_leases` table).

A worker has an inventory of devices of one kind: the GPUs of its machine (those `nvidia-smi` lists,
or as many as `DISTILL_WORKER_GPUS` declares), or, without GPUs, `worker_cpu_processes` CPU process
slots. Before it starts a job it leases as many devices as the job's `resources.devices` from that
inventory, and releases them when the attempt ends, however it ends. A worker of a node group also
runs jobs of whole machines of the group (`worker/node_group.py`): such a job leases all of this
machine's devices. Leases are rows keyed by host and
device: two workers on one machine never hand out the same device, and the database shows who holds
what. A lease is stale, and taken back by the next worker that needs the device, once its worker no
longer counts as alive (a worker killed without releasing) or its job has ended.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from datetime import timedelta
from functools import lru_cache
from typing import NamedTuple

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import db_now
from app.models import TERMINAL, DeviceLease, Job, RegisteredWorker
from worker.node_group import group_sizes, read_hostfile


class Inventory(NamedTuple):
    kind: str  # "gpu" or "cpu": the queues it serves (gpu-N or cpu-N, and auto-N)
    count: int  # devices 0..count-1 of this machine
    group_sizes: tuple[int, ...] = ()  # bigger jobs it runs across the machines of its node group (DISTILL_HOSTFILE)

    @property
    def queues(self) -> list[str]:
        sizes = [*range(1, self.count + 1), *(n for n in self.group_sizes if n > self.count)]
        return [f"{self.kind}-{n}" for n in sizes] + [f"auto-{n}" for n in sizes]


@lru_cache
def _visible_gpus() -> int:
    """GPUs of this machine, counted without importing torch (no CUDA state in the worker)."""
    if not shutil.which("nvidia-smi"):
        return 0
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))


def inventory(settings: Settings) -> Inventory:
    gpus = settings.worker_gpus if settings.worker_gpus is not None else _visible_gpus()
    group = group_sizes(read_hostfile(settings.hostfile)) if settings.hostfile is not None else ()
    return Inventory("gpu", gpus, group) if gpus else Inventory("cpu", settings.worker_cpu_processes, group)


def host() -> str:
    return socket.gethostname()


def acquire(
    session: Session, job_id: str, count: int, inventory: Inventory, worker: str, liveness: timedelta
) -> list[int] | None:
    """Lease the `count` lowest free devices of this host's inventory to `job_id` for `worker`; None
    (nothing leased) while fewer are free. Stale leases are taken back first."""
    machine, now = host(), db_now(session)
    alive = select(RegisteredWorker.name).where(RegisteredWorker.seen_at >= now - liveness)
    ended = select(Job.id).where(Job.status.in_(TERMINAL))
    session.execute(
        delete(DeviceLease).where(
            DeviceLease.host == machine, DeviceLease.worker.not_in(alive) | DeviceLease.job_id.in_(ended)
        )
    )
    held = set(session.scalars(select(DeviceLease.device).where(DeviceLease.host == machine)))
    free = [device for device in range(inventory.count) if device not in held]
    if len(free) < count:
        session.commit()  # the stale leases stay released
        return None
    chosen = free[:count]
    session.add_all(DeviceLease(host=machine, device=d, job_id=job_id, worker=worker, acquired_at=now) for d in chosen)
    try:
        session.commit()
    except IntegrityError:  # another worker of this machine leased one of them meanwhile: try again later
        session.rollback()
        return None
    return chosen


def release(session: Session, job_id: str, worker: str) -> None:
    session.execute(delete(DeviceLease).where(DeviceLease.job_id == job_id, DeviceLease.worker == worker))
    session.commit()

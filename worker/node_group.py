"""A node group: machines that run one job's ranks together, listed in a DeepSpeed hostfile
(`DISTILL_HOSTFILE`), started through DeepSpeed's own multi-node launcher (pdsh over ssh).

The worker runs on the hostfile's first machine and consumes, beside the sizes its own devices run,
the sizes that whole machines of the group add up to (`slots` × 2, × 3, ...). Every rank is started
by ssh, so it sees none of the worker's environment: the settings a training process reads are
written to a file of this attempt that the launcher exports to every rank (`DS_ENV_FILE`), and
nothing else (not the API's signing keys, not the broker). The rendezvous port is chosen on the first
host, where rank 0 listens.

Imports nothing heavy: the Celery worker uses it and must not load torch.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

# What a training process reads from its environment: where the database, files, cache and bucket
# are, and how long it may wait on them.
RANK_SETTINGS = (
    "DISTILL_DATA_DIR",
    "DISTILL_DATABASE_URL",
    "DISTILL_ARTIFACTS_DIR",
    "DISTILL_CACHE_DIR",
    "DISTILL_HEARTBEAT_SECONDS",
    "DISTILL_HEARTBEAT_TIMEOUT_SECONDS",
    "DISTILL_MODEL_ROOTS",
    "DISTILL_DATA_ROOTS",
    "DISTILL_ALLOW_HUB_MODELS",
    "DISTILL_S3_BUCKET",
    "DISTILL_S3_ENDPOINT_URL",
    "DISTILL_S3_PREFIX",
    "DISTILL_COLLECTIVE_TIMEOUT_SECONDS",
    "PGOPTIONS",
    "TORCH_EXTENSIONS_DIR",
)
RANK_SETTING_PREFIXES = ("AWS_", "HF_")  # the bucket's credentials and region; the model hub's cache and mode


class Host(NamedTuple):
    name: str
    slots: int


class HostfileError(ValueError):
    """The hostfile cannot describe a node group."""


def read_hostfile(path: Path) -> list[Host]:
    """DeepSpeed's hostfile format: `HOST slots=N` per line, `#` comments. Every host must have the
    same number of slots: the launcher starts `--num_gpus` ranks on each machine it uses."""
    hosts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, slots = line.partition(" slots=")
        if not slots.strip().isdigit() or int(slots) < 1 or " " in name.strip():
            raise HostfileError(f"{path}, line {number}: expected 'HOST slots=N', got {line!r}")
        hosts.append(Host(name.strip(), int(slots)))
    if not hosts:
        raise HostfileError(f"{path}: no hosts")
    if len({h.slots for h in hosts}) > 1:
        raise HostfileError(f"{path}: every host needs the same slots (the launcher runs as many ranks on each)")
    return hosts


def group_sizes(hosts: list[Host]) -> tuple[int, ...]:
    """The job sizes that span 2 or more whole machines of the group."""
    return tuple(hosts[0].slots * n for n in range(2, len(hosts) + 1))


def launcher_options(hosts: list[Host], devices: int, port: int) -> list[str]:
    """The DeepSpeed launcher's options for a job of `devices` ranks over the group's first machines."""
    slots = hosts[0].slots
    return [
        "--num_nodes",
        str(devices // slots),
        "--num_gpus",
        str(slots),
        "--master_addr",
        hosts[0].name,
        "--master_port",
        str(port),
    ]


def free_port_on(host: str, timeout: float = 60) -> int:
    """A TCP port nobody listens on now on `host`, asked over ssh with this worker's Python (the
    group's machines have the same install at the same path)."""
    probe = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
    remote = shlex.join([sys.executable, "-c", probe])
    done = subprocess.run(["ssh", "-o", "BatchMode=yes", host, remote], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not done.stdout.strip().isdigit():
        raise HostfileError(f"cannot reach {host} over ssh to pick the rendezvous port: {done.stderr.strip()[-500:]}")
    return int(done.stdout.strip())


def write_rank_environment(env: Mapping[str, str], path: Path) -> Path:
    """The settings of `env` that ranks need, as the launcher's KEY=VALUE environment file (only the
    worker's user can read it)."""
    lines = [
        f"{k}={v}"
        for k, v in sorted(env.items())
        if (k in RANK_SETTINGS or k.startswith(RANK_SETTING_PREFIXES)) and v and "\n" not in v
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("".join(line + "\n" for line in lines))
    return path

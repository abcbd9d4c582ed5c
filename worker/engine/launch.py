"""Starting training processes: a free rendezvous port and the DeepSpeed launcher command.

Imports nothing heavy: the Celery worker uses it and must not load torch.
"""

import socket
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port nobody listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(
    devices: int, module_args: list[str], hostfile: Path | None = None, include: list[int] | None = None
) -> list[str]:
    """Run `python -m MODULE ARGS` once per device under the DeepSpeed launcher of this environment:
    on `devices` local devices (the ordinals `include` names, when given: the launcher's own
    `--include`, which sets each rank's CUDA_VISIBLE_DEVICES), or across the machines of a DeepSpeed
    hostfile (over ssh)."""
    command = [str(Path(sys.executable).with_name("deepspeed")), "--master_port", str(free_port())]
    if hostfile is not None:
        command += ["--hostfile", str(hostfile)]
    elif include is not None:
        command += ["--include", "localhost:" + ",".join(str(device) for device in include)]
    else:
        command += ["--num_gpus", str(devices)]
    return [*command, "--module", *module_args]

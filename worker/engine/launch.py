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


def deepspeed_command(module_args: list[str], placement: list[str]) -> list[str]:
    """Run `python -m MODULE ARGS` under the DeepSpeed launcher of this environment, where the
    launcher's own `placement` options say: `--num_gpus N` or `--include localhost:a,b` on this
    machine (the launcher sets each rank's CUDA_VISIBLE_DEVICES), or a hostfile's machines with their
    rendezvous address and port (over ssh). A local rendezvous gets a free port of this machine."""
    if "--master_port" not in placement:
        placement = ["--master_port", str(free_port()), *placement]
    return [str(Path(sys.executable).with_name("deepspeed")), *placement, "--module", *module_args]


def launch_command(devices: int, spec_path: Path, output_dir: Path) -> list[str]:
    """The DeepSpeed launcher command that runs `worker.engine.run` once per device on this machine."""
    return deepspeed_command(
        ["worker.engine.run", str(spec_path), "--output", str(output_dir)], ["--num_gpus", str(devices)]
    )

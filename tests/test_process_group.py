"""init_process_group: a single CPU process joins without DeepSpeed's shared-memory op."""

import os
import subprocess
import sys

SCRIPT = """
from worker.engine.spec import parse_spec
from worker.engine.distributed import init_process_group
import deepspeed.comm.comm as comm
assert str(init_process_group(parse_spec({"student": {"model": "x"}}))) == "cpu"
print(comm.cdb.shm_comm_op is None)
"""


def test_one_cpu_process_compiles_no_shared_memory_op(tmp_path):
    extensions = tmp_path / "torch_extensions"
    # A fresh process, not one of this test session's group (whose port may be taken by now).
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True"
    assert not extensions.exists() or not any(extensions.rglob("*.so"))  # nothing was compiled

"""init_process_group: a single CPU process joins without DeepSpeed's shared-memory op; op builds
survive a killed builder."""

import os
import subprocess
import sys

import pytest

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
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True"
    assert not extensions.exists() or not any(extensions.rglob("*.so"))  # nothing was compiled


HOLD_THE_BATON = """
import sys, time
import torch.utils.cpp_extension as cpp_extension
from worker.engine.op_builds import prepare_op_builds
prepare_op_builds()
baton = cpp_extension.FileBaton(sys.argv[1])
assert baton.try_acquire()
print("holding", flush=True)
time.sleep(600)
"""

TAKE_THE_BATON = """
import sys
import torch.utils.cpp_extension as cpp_extension
from worker.engine.op_builds import prepare_op_builds
prepare_op_builds()
baton = cpp_extension.FileBaton(sys.argv[1])
print(baton.try_acquire())
baton.release()
"""


def test_a_process_killed_while_building_an_op_leaves_the_build_to_the_next_one(tmp_path):
    """torch's own baton is a file that a killed builder leaves behind: every later load of that op
    then waits forever (what hung the multi-process jobs after a cancelled one), or, told the build
    was done, imports a library that is not there. Ours: the next process waits while the builder
    lives, then takes the baton and builds itself."""
    lock = str(tmp_path / "lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_BATON, lock], stdout=subprocess.PIPE, text=True)
    taker = None
    try:
        assert holder.stdout.readline().strip() == "holding"
        taker = subprocess.Popen([sys.executable, "-c", TAKE_THE_BATON, lock], stdout=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            taker.wait(timeout=5)  # waits while the builder lives
        holder.kill()
        holder.wait()
        out, _ = taker.communicate(timeout=60)
        assert out.strip() == "True"  # and, the builder dead, builds itself
        assert os.path.exists(lock)  # though the killed holder left its file behind, as with torch's baton
    finally:
        for process in (holder, taker):
            if process is not None and process.poll() is None:
                process.kill()

"""keep_freed_memory: freed blocks stay in the process instead of going back to the OS."""

import subprocess
import sys

SCRIPT = """
import sys, torch
from worker.engine.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = rss_mb()
block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
del block
print(rss_mb() - before)
"""


def grown_after_free(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def test_a_freed_64_mb_block_stays_resident_only_when_asked():
    assert grown_after_free("default") < 16  # glibc unmapped it on free
    assert grown_after_free("keep") > 48  # kept for the next allocation

"""DeepSpeed's JIT-compiled ops (the CPU all-reduce, CPU Adam, fused GPU kernels), built and loaded
safely when several jobs share one cache.

torch builds and loads a JIT extension under a lock *file* (`torch.utils.file_baton.FileBaton`): the
file exists while a process builds or loads the op, and waiting means polling until it is deleted.
A process killed in between (a job cancelled, or a rank lost, while it starts) leaves the file
behind, and every later process that loads that op waits for it forever: one cancelled two-device
job hung every multi-process job after it on that machine. We give torch a lock the kernel drops
when its holder dies (`flock`, through `filelock`) on the same path; a file left behind by an old
process holds nothing.
"""

from __future__ import annotations

import os

from filelock import FileLock, Timeout

from .paths import cache_dir


class KernelReleasedBaton:
    """torch's FileBaton interface (try_acquire, wait, release) over a lock released on process death."""

    def __init__(self, lock_file_path: str, wait_seconds: float = 0.1, warn_after_seconds: float | None = None) -> None:
        self._lock = FileLock(lock_file_path)

    def try_acquire(self) -> bool:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        return True

    def wait(self) -> None:
        """Until the holder has finished, or died (then the op's load fails and says so, rather
        than hanging: the job's next attempt builds it)."""
        with self._lock:
            pass

    def release(self) -> None:
        self._lock.release()


def prepare_op_builds() -> None:
    """Before DeepSpeed loads any op: build into the cache (TORCH_EXTENSIONS_DIR defaults to the
    home directory), under locks that die with their holders."""
    import torch.utils.cpp_extension

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))
    torch.utils.cpp_extension.FileBaton = KernelReleasedBaton

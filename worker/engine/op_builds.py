"""DeepSpeed's JIT-compiled ops (the CPU all-reduce, CPU Adam, fused GPU kernels), built and loaded
safely when several jobs share one cache.

torch builds and loads a JIT extension under a lock *file* (`torch.utils.file_baton.FileBaton`): the
file exists while a process builds or loads the op, and waiting means polling until it is deleted.
A process killed in between (a job cancelled, or a rank lost, while it starts) leaves the file
behind, and every later process that loads that op waits for it forever: one cancelled two-device
job hung every multi-process job after it on that machine. We give torch a lock the kernel drops
when its holder dies (`flock`, through `filelock`) on the same path, and every process takes it in
turn and builds (ninja finds an up-to-date build at once): one whose holder died mid-build completes
that build instead of importing half of it. A file left behind by an old process holds nothing.
"""

from __future__ import annotations

import os

from filelock import FileLock

from .paths import cache_dir


class KernelReleasedBaton:
    """torch's FileBaton interface over a lock released on process death."""

    def __init__(self, lock_file_path: str, wait_seconds: float = 0.1, warn_after_seconds: float | None = None) -> None:
        self._lock = FileLock(lock_file_path)

    def try_acquire(self) -> bool:
        """Once the holder has finished or died: this process builds next."""
        self._lock.acquire()
        return True

    def wait(self) -> None:
        raise AssertionError("torch waits only when try_acquire fails, which it never does")

    def release(self) -> None:
        self._lock.release()


def prepare_op_builds() -> None:
    """Before DeepSpeed loads any op: build into the cache (TORCH_EXTENSIONS_DIR defaults to the
    home directory), under locks that die with their holders."""
    import torch.utils.cpp_extension

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))
    torch.utils.cpp_extension.FileBaton = KernelReleasedBaton

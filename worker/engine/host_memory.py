"""Keep freed host memory in the process, so that a CPU step does not page-fault its temporaries back.

glibc serves every allocation above its mmap threshold (at most 32 MB, adjusted as it goes) with a
fresh mapping and unmaps it on free, and trims the top of the heap once 128 kB are free there. A
training step on the CPU allocates and frees the same large temporaries every time (logits, their
fp32 chunks, activations, gradients), so each one came back as new pages the kernel had to fault in
and zero: on the demo's MiniLLM step that was a tenth of the step, and half of the optimizer's time.
With a 256 MB threshold and a 1 GB trim threshold freed blocks are reused; peak memory is the same
(what is in use at once does not change), resident memory just does not shrink between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed memory; False where the C library is not glibc (nothing set)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(
        mallopt(option, value) == 1
        for option, value in ((M_MMAP_THRESHOLD, 256 * 2**20), (M_TRIM_THRESHOLD, 2**30), (M_TOP_PAD, 256 * 2**20))
    )

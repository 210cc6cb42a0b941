"""Process settings that make CPU training faster; the `robustbp` command applies them.

PyTorch's CPU allocator keeps no cache: glibc serves every tensor above 128 KiB with a fresh
mmap, so each step's large activations are page-faulted in and returned to the system again.
Raising glibc's mmap and trim thresholds keeps freed memory in the heap for the next step.
Measured on the IBP MNIST net, batch 128, 2 CPU cores (docs/performance.md): a standard step
60–65 ms → 57–58 ms, a Loss IBP step 111–115 ms → 96–97 ms. The cost: the process keeps
its peak memory until it ends.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ONE_GIB = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of unmapping it; False where that is not possible
    (not Linux/glibc). Call it once, early; it changes the whole process."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _ONE_GIB)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _ONE_GIB))
    except (OSError, AttributeError):
        return False

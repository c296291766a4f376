"""Keep freed host memory in the process, so each training step does not page-fault its tensors in again.

glibc hands every block over 32 MiB (its mmap threshold, which grows only up to that) back to the kernel on
free and maps it anew on the next allocation. A CPU training step allocates and frees the same large tensors
every time (a [4096, 4096] float32 logit block is 64 MiB, and so are its copy and its gradient), so it pays the
kernel's page faults on every step: measured on the comparison's default model, 2 cores, medians of 25 steps in
three alternating rounds, a dense step took 400-480 ms with glibc's defaults and 260-335 ms with freed memory kept,
a Switch-32 step 510-560 ms against 330-405 ms. PyTorch's CPU performance guide recommends a caching allocator
(jemalloc, tcmalloc) for the same reason; this is the same effect with the allocator already loaded, through
``mallopt``. The process keeps its peak footprint instead of returning it, which a training process reaches
again on the next step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve every size from its heap and never trim it; True when it took effect.

    A no-op (False) off Linux or with another C library. Once per process; later allocations are affected.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; a trim threshold of 2**30 bytes never trims below a step's footprint.
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1

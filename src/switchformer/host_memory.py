"""Keep freed host memory in the process, so each training step does not page-fault its tensors in again.

glibc hands every block over 32 MiB (its mmap threshold, which grows only up to that) back to the kernel on
free and maps it anew on the next allocation. A CPU training step allocates and frees the same large tensors
every time: a Switch layer's expert gradients (``[E, d_model, d_ff]``, 512 MiB each at 128 experts of
512 x 2048), a [4096, 4096] float32 logit block and its gradient. Set to ``None`` by ``zero_grad()`` and
allocated again by the next backward, each is page-faulted in anew, which costs more than the step's arithmetic
on some machines. PyTorch's CPU performance guide recommends a caching allocator (jemalloc, tcmalloc) for the
same reason; :func:`keep_freed_memory` has the same effect with the allocator already loaded, through
``mallopt``. The process keeps its peak footprint instead of returning it, which a training process reaches
again on the next step anyway.

Building a :class:`~switchformer.moe.layer.SwitchFFN` applies it (:func:`apply_default`), so a training loop of
one's own gets the speed the benchmarks measure; ``SWITCHFORMER_KEEP_FREED_MEMORY=0`` in the environment turns
that off. Measurements: ``bench/bench_plain_loop.py``, ``docs/results/plain-loop/``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

ENVIRONMENT_SWITCH = "SWITCHFORMER_KEEP_FREED_MEMORY"  # "0": Switch layers leave glibc's settings alone
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


def apply_default() -> bool:
    """:func:`keep_freed_memory` unless the environment sets ``SWITCHFORMER_KEEP_FREED_MEMORY=0``; its result, or
    False when switched off."""
    if os.environ.get(ENVIRONMENT_SWITCH, "1").strip() == "0":
        return False
    return keep_freed_memory()

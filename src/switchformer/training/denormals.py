"""Flush denormal floats to zero on CPU, so a model cannot slow down as its softmaxes grow peaky.

As a model learns, some softmax probabilities underflow below float32's smallest normal number (1.2e-38) into the
denormal range, where x86 cores take a slow microcode path for every operation that reads them; PyTorch's CPU
performance guide recommends the flush. How much it buys depends on how many denormals there are. The
quickstart's ``switch-tiny-8`` writes few (under one in a thousand of its float32 values at step 250), so there
the flush is insurance rather than a speedup, and the loss is unchanged; ``bench/bench_denormals.py`` counts them
and times both modes (figures in docs/performance.md).

The flag lives in each thread's floating-point control register, and threads inherit it when they are created, so
it reaches the intra-op thread pool only if set before the pool starts: the command line sets it first thing; a
library user's :meth:`~switchformer.training.trainer.Trainer.train` gets it on the calling thread and on threads
started while it runs. It is set only for the span of the work and then restored on the calling thread, because
the register is process-wide state that other code reads: Python's own float arithmetic obeys it, and libraries
that check IEEE-754 conformance (Hypothesis, for one) refuse to run while it is set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def denormals_are_flushed() -> bool:
    """Whether this thread treats denormals as zero: the smallest positive double times one, computed now."""
    smallest_denormal, one = 5e-324, float(len("x"))  # a runtime value, so the product is not folded at compile time
    return smallest_denormal * one == 0.0


@contextlib.contextmanager
def flushed_denormals(enabled: bool = True) -> Iterator[bool]:
    """Treat denormals as zero inside the block (and on threads it starts); yields whether the CPU supports it (x86).

    On exit the calling thread gets back the mode it had; threads started inside keep the flush.
    """
    if not enabled:
        yield False
        return
    was_flushed = denormals_are_flushed()
    supported = bool(torch.set_flush_denormal(True))
    try:
        yield supported
    finally:
        if supported and not was_flushed:
            torch.set_flush_denormal(False)

"""Flush denormal floats to zero on CPU, so a model does not slow down as it trains.

As a model learns, its softmaxes grow peaky and some probabilities underflow below float32's smallest normal
number (1.2e-38) into the denormal range, where x86 cores take a slow microcode path for every operation that reads
them. The matmuls of attention's backward pass then read tens of thousands of them: measured on the quickstart's
``switch-tiny-8`` at step 250, 2 threads, a forward and backward took 1.18-1.41 s against 0.92-1.00 s with
denormals flushed (0.93-1.05 s for the untrained model either way), and training's tokens/s fell from about 5.5k to
3.5k over the first 250 steps. PyTorch's CPU performance guide recommends the flush; GPUs do the same in bf16.

The flag lives in each thread's floating-point control register, and threads inherit it when they are created, so
it reaches the intra-op thread pool only if set before the pool starts: the command line sets it first thing; a
library user who builds a :class:`~switchformer.training.trainer.Trainer` gets it on threads started afterwards.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def flush_denormal_floats() -> bool:
    """Treat denormal inputs and results as zero on this thread and threads it starts; True where supported (x86)."""
    return bool(torch.set_flush_denormal(True))

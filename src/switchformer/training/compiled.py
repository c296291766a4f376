"""``torch.compile`` of a model's transformer blocks, one block at a time, for training forwards.

Why blocks and not the whole model: every block of a stack has the same code and shapes, so one compiled graph
serves them all (compile time does not grow with depth, as torchtitan found), and the parts a block cannot hold
in one graph (the host reads of dropless or next-best routing, expert-parallel all-to-alls) break only that block's
graph. The embedding and the output layer with its loss stay eager. Why training forwards only: evaluation runs
rarely, and decoding changes its shapes at every step (the KV cache grows), which would recompile the blocks
until torch gives up; both run the eager blocks. The compiled twins share the blocks' parameters, so parameter
names, checkpoints and the optimizer see the same module tree.
"""

from __future__ import annotations

import torch
from torch import nn

from switchformer.models.stack import transformer_stacks


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every block of ``model``'s stacks with ``backend`` for training; returns how many were compiled.

    ``inductor`` generates fused kernels (on CPU it needs a C++ compiler); ``aot_eager`` traces the same graphs
    without generating code, to check that a model compiles.
    """
    available = torch._dynamo.list_backends(exclude_tags=())
    if backend not in available:
        raise ValueError(f"torch.compile backend {backend!r} is unknown; choose one of {sorted(available)}")
    stacks = transformer_stacks(model, "compile")
    for stack in stacks:
        stack.compiled_blocks = [torch.compile(block, backend=backend) for block in stack.blocks]
    return sum(len(stack.blocks) for stack in stacks)

"""FSDP2 (``fully_shard``) over the layout's mesh, composed with expert parallelism as torchtitan composes them.

Applied from outside to a model whose experts :func:`~switchformer.parallel.apply_expert_parallel` already split:

* each Switch layer's experts module is sharded over the expert mesh ``(dp_replicate, dp_shard)``; its gradient
  is divided by the whole world size, not the expert mesh's: every rank's tokens reach an expert through the
  all-to-all, so its local gradient is already a sum over the ``ep`` ranks (see :mod:`.data_parallel`);
* each router is its own unit kept in float32 whatever the compute dtype (the paper's selective precision);
* each transformer block, then the root (embeddings, norms, output head), is sharded over the dense mesh
  ``(dp_replicate, dp_shard_ep)``: parameters all-gathered before a block's forward, gradients reduce-scattered
  during backward (FSDP2 overlaps both with compute), replicas all-reduced across ``dp_replicate`` (HSDP).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from switchformer.models.stack import transformer_stacks
from switchformer.moe.layer import SwitchFFN
from switchformer.parallel.mesh import ParallelLayout


@dataclasses.dataclass(frozen=True)
class ShardingOptions:
    param_dtype: torch.dtype | None = None  # compute dtype of the all-gathered weights (None: as stored)
    reduce_dtype: torch.dtype = torch.float32  # gradients are reduced in float32
    reshard_after_forward: bool = True  # ZeRO-3: free gathered weights after each block's forward


# The experts' output rows are a view of their batched result; the dispatcher only ever gathers from it (never
# writes into it), which is the case FSDP2's warning about returned views is not about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPGroupedExperts\) returned a view tensor")


def apply_fsdp(model: nn.Module, layout: ParallelLayout, options: ShardingOptions | None = None) -> nn.Module:
    """Shard ``model`` in place over ``layout`` (see the module docstring); returns ``model``."""
    options = options or ShardingOptions()
    policy = MixedPrecisionPolicy(param_dtype=options.param_dtype, reduce_dtype=options.reduce_dtype)
    float32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    sharded = {"mp_policy": policy, "reshard_after_forward": options.reshard_after_forward}
    sum_only = layout.device.type != "cuda"  # gloo has no pre-multiplied sum: scale before and after instead
    for stack in transformer_stacks(model, "shard"):
        for block in stack.blocks:
            for layer in block.modules():
                if isinstance(layer, SwitchFFN):
                    fully_shard(layer.router, mesh=layout.dense_mesh, mp_policy=float32)
                    experts = fully_shard(layer.experts, mesh=layout.expert_mesh, **sharded)
                    experts.set_gradient_divide_factor(float(layout.world_size))
                    # With one shard (dp_shard == 1) there is no reduce-scatter: FSDP2 divides the gradient by the
                    # factor while copying it out, and a forced sum reduction divides it by the factor again
                    # afterwards (W^2 in all). Unforced, it divides once; the only collective left is HSDP's
                    # all-reduce, a plain sum that gloo has.
                    experts.set_force_sum_reduction_for_comms(sum_only and layout.dims.dp_shard > 1)
            dense = fully_shard(block, mesh=layout.dense_mesh, **sharded)
            dense.set_force_sum_reduction_for_comms(sum_only)
    root = fully_shard(model, mesh=layout.dense_mesh, mp_policy=policy, reshard_after_forward=False)
    root.set_force_sum_reduction_for_comms(sum_only)
    for method in ("encode",):  # called by generate() besides forward: gather the root's weights for it too
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce gradients after this backward (the last micro-batch) or keep accumulating them unsharded."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)

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
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import Shard

from switchformer.models.stack import transformer_stacks
from switchformer.moe.layer import SwitchFFN
from switchformer.parallel.mesh import ParallelLayout


@dataclasses.dataclass(frozen=True)
class ShardingOptions:
    param_dtype: torch.dtype | None = None  # compute dtype of the all-gathered weights (None: as stored)
    reduce_dtype: torch.dtype = torch.float32  # gradients are reduced in float32
    reshard_after_forward: bool = True  # ZeRO-3: free gathered weights after each block's forward


# Blocks, experts and the model return views (reshaped outputs); FSDP2 warns that an in-place op on such a view
# would skip its backward hook. The model never writes into a module's output in place, and the layouts' gradients
# are tested against one process (tests/parallel), which such a skipped hook would break.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w+\) returned a view tensor")


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
                    placement = _expert_placement(layer, layout)
                    experts = fully_shard(
                        layer.experts, mesh=layout.expert_mesh, shard_placement_fn=placement, **sharded
                    )
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


def _expert_placement(layer: SwitchFFN, layout: ParallelLayout) -> Callable[[nn.Parameter], Shard]:
    """Shard an expert slice on its expert dimension when it holds at least one expert per shard rank, else on
    ``d_model`` (dim 1, which FSDP2 can only split evenly): one expert per ``ep`` rank split over 4 shard ranks must
    not leave 3 of them empty."""
    local_experts = layer.config.moe.num_experts // layout.ep_size
    shards = layout.dims.dp_shard
    even_rows = layer.config.d_model % shards == 0
    placement = Shard(1) if local_experts < shards and even_rows else Shard(0)
    return lambda _param: placement


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce gradients after this backward (the last micro-batch) or keep accumulating them unsharded."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)

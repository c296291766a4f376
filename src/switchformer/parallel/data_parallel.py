"""Data parallelism around expert parallelism: slicing the global batch, gradient averaging, global grad norm.

Why the two parameter kinds are reduced differently. Each of the ``W = ep * dp`` ranks holds an equal slice of
the global batch and computes its own loss ``L_r`` (the model's mean over the slice). The single-process loss of
the global batch is their mean ``L = (1/W) sum_r L_r`` when every slice holds the same number of label tokens
and of non-empty routing groups (the cross-entropy and the router losses are means over those).

* A dense or replicated parameter (embeddings, attention, routers) on rank ``r`` only influences ``L_r``: the
  all-to-all carries hidden states to other ranks' experts, never through other ranks' dense weights. So rank
  ``r``'s gradient is ``dL_r/dtheta`` and ``dL/dtheta = (1/W) sum_r dL_r/dtheta``: **average over all ranks**.
* An expert weight lives on one rank ``h`` of each EP group, and tokens from every rank of that group reach it.
  The backward of the combine all-to-all returns each source's ``dL_r/dy`` to ``h``, so ``h``'s local gradient is
  already the *sum* ``sum_{r in EP(h)} dL_r/dw`` over its EP group. Summing over the expert-DP group (the ``dp``
  replicas of that slice) covers every rank once, so ``dL/dw = (1/W) sum_{replicas} grad``: **sum over the
  expert-DP group, divide by W** (not by ``dp``, which would make expert gradients ``ep`` times too large).

If slices hold different numbers of label tokens, scale each rank's cross-entropy by
``W * labels_r / labels_global`` before backward; the averages above then give the global token mean exactly.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from switchformer.parallel.collectives import collective
from switchformer.parallel.expert_parallel import expert_shards
from switchformer.parallel.mesh import ParallelLayout

Batch = dict[str, torch.Tensor]


def slice_global_batch(batch: Batch, layout: ParallelLayout) -> Batch:
    """Rank ``r``'s contiguous ``1/W`` of the global batch (along dim 0), the same on every layout of ``W`` ranks.

    The ranks' tokens concatenated in rank order are the single-process flattened batch, so routing groups that do
    not straddle a slice (``grouping='sequence'``, or a ``group_size`` dividing the slice's tokens) are the groups
    one process forms.
    """
    sizes = {name: value.shape[0] for name, value in batch.items()}
    rows = next(iter(sizes.values()))
    if any(size != rows for size in sizes.values()) or rows % layout.world_size:
        raise ValueError(
            f"the global batch (rows per field: {sizes}) must split into {layout.world_size} equal slices, one per "
            "rank; use a global batch size divisible by the world size"
        )
    per_rank = rows // layout.world_size
    start = layout.rank * per_rank
    return {name: value[start : start + per_rank] for name, value in batch.items()}


@torch.no_grad()
def sync_gradients(model: nn.Module, layout: ParallelLayout) -> None:
    """Turn each rank's local gradients into the single-process gradient of the global mean loss (module doc).

    Call on every rank after backward (after the last micro-batch) and before clipping and the optimizer step.
    Parameters without a gradient are skipped; which ones those are must agree across ranks (it does when all
    ranks run the same model code).
    """
    shard_names = set(expert_shards(model))
    dense, experts = [], []
    for name, param in model.named_parameters():
        if param.grad is not None:
            (experts if name in shard_names else dense).append(param.grad)
    _reduce(dense, layout.dense_group, layout.world_size, layout.world_size, "gradient all-reduce (dense)")
    _reduce(experts, layout.expert_dp_group, layout.dp_size, layout.world_size, "gradient all-reduce (experts)")


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, layout: ParallelLayout) -> torch.Tensor:
    """Clip by the norm of the *whole* model's gradient, as one process would; returns that norm on every rank.

    ``torch.nn.utils.clip_grad_norm_`` would see only this rank's expert slice and give each EP rank a different
    norm and scale, so replicated weights would drift apart. Call after :func:`sync_gradients`: dense gradients
    are then equal on all ranks, and each expert slice is counted once by summing over the EP group.
    """
    shard_names = set(expert_shards(model))
    grads = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    device = grads[0][1].device if grads else layout.device
    dense_sq = torch.zeros((), dtype=torch.float32, device=device)
    expert_sq = torch.zeros((), dtype=torch.float32, device=device)
    for name, grad in grads:
        square = grad.detach().float().square().sum()
        if name in shard_names:
            expert_sq += square
        else:
            dense_sq += square
    if layout.ep_size > 1:
        with collective("gradient-norm all-reduce", layout.ep_group):
            dist.all_reduce(expert_sq, group=layout.ep_group)
    total = (dense_sq + expert_sq).sqrt()
    # torch's rule: scale by max_norm / (norm + 1e-6), never up; applied even when the norm is not finite.
    if max_norm != math.inf:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for _, grad in grads:
            grad.mul_(scale.to(grad.dtype))
    return total


def mean_over_ranks(value: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """Average a (detached) metric, such as each rank's loss, over all ranks: the global batch's value."""
    result = value.detach().float().clone().reshape(-1)
    with collective("metric all-reduce", layout.dense_group):
        dist.all_reduce(result, group=layout.dense_group)
    return (result / layout.world_size).reshape(value.shape)


def _reduce(
    grads: list[torch.Tensor], group: dist.ProcessGroup | None, group_size: int, divisor: int, what: str
) -> None:
    """Sum ``grads`` over ``group`` in one flat buffer per dtype, then divide by ``divisor``."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        if group_size > 1:
            with collective(what, group):
                dist.all_reduce(flat, group=group)
        flat.div_(divisor)
        offset = 0
        for grad in same:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

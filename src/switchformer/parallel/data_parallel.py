"""Data parallelism: slicing the global batch, the global gradient norm, metrics averaged over ranks.

Why the gradients come out right. Each of the ``W`` ranks holds an equal slice of the global batch and computes
its own loss ``L_r`` (the model's mean over the slice). The single-process loss of the global batch is their mean
``L = (1/W) sum_r L_r`` when every slice holds the same number of label tokens and of non-empty routing groups.

* A dense parameter on rank ``r`` only influences ``L_r`` (the all-to-all carries hidden states to other ranks'
  experts, never through other ranks' dense weights), so ``dL/dtheta = (1/W) sum_r dL_r/dtheta``: FSDP2's
  reduce-scatter (and HSDP's all-reduce across replicas) **averages over all ranks**.
* An expert weight's slice lives on one rank of each ``ep`` group, and tokens from every rank of the group reach
  it: the backward of the combine all-to-all returns each source's ``dL_r/dy``, so the local gradient is already
  the *sum* over the ``ep`` ranks. FSDP2 sums it over the ranks holding the same slice and must divide by ``W``,
  not by their number (``parallel.fsdp`` sets that divide factor).

If slices hold different numbers of label tokens, the trainer scales each rank's cross-entropy by
``W * labels_r / labels_global`` before backward; the averages above then give the global token mean exactly.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from switchformer.moe.batch_slices import BatchSlice
from switchformer.parallel.collectives import collective
from switchformer.parallel.mesh import ParallelLayout

Batch = dict[str, torch.Tensor]


def slice_global_batch(batch: Batch, layout: ParallelLayout) -> Batch:
    """Rank ``r``'s contiguous ``1/W`` of the global batch (along dim 0), the same on every layout of ``W`` ranks.

    The ranks' tokens concatenated in rank order are the single-process flattened batch, so routing groups within a
    slice are the groups one process forms, and groups spanning several slices are routed together inside
    :func:`batch_slice`'s context (``moe.batch_slices``).
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
def clip_grad_norm_(model: nn.Module, max_norm: float, layout: ParallelLayout) -> torch.Tensor:
    """Clip by the norm of the *whole* model's gradient, as one process would; returns that norm on every rank.

    Every parameter is split over the ``dp_shard * ep`` ranks of a replica (dense weights by FSDP2, expert weights
    by expert parallelism and FSDP2), and the replicas hold equal gradients once reduced: one all-reduce of the
    local squared norms over that group gives the global norm. torch's rule: scale by ``max_norm / (norm + 1e-6)``,
    never up, applied even when the norm is not finite.
    """
    grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]
    device = grads[0].device if grads else layout.device
    squared = torch.zeros((), dtype=torch.float32, device=device)
    for grad in grads:
        squared += grad.detach().float().square().sum()
    with collective("gradient-norm all-reduce", layout.shard_group):
        dist.all_reduce(squared, group=layout.shard_group)
    total = squared.sqrt()
    if max_norm != math.inf:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(scale.to(grad.dtype))
    return total


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def mean_over_ranks(value: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """Average a (detached) metric, such as each rank's loss, over all ranks: the global batch's value."""
    result = value.detach().float().clone().reshape(-1)
    with collective("metric all-reduce", layout.world_group):
        dist.all_reduce(result, group=layout.world_group)
    return (result / layout.world_size).reshape(value.shape)


def batch_slice(layout: ParallelLayout) -> BatchSlice:
    """This rank's place among the slices of the global batch, for routing groups that span slices
    (:mod:`switchformer.moe.batch_slices`): slice ``rank`` of ``world_size``, as :func:`slice_global_batch` cuts."""
    return BatchSlice(index=layout.rank, count=layout.world_size, gather=_SliceGather(layout))


class _SliceGather:
    """``all_gather`` among the ``span`` consecutive ranks whose slices make one routing group; the process groups
    of each span are created once (a collective of every rank, reached by all in the same layer)."""

    def __init__(self, layout: ParallelLayout) -> None:
        self.layout = layout
        self.groups: dict[int, dist.ProcessGroup] = {}

    def __call__(self, tensor: torch.Tensor, span: int) -> torch.Tensor:
        if span not in self.groups:
            world = self.layout.world_size
            if span == world:
                self.groups[span] = self.layout.world_group
            else:
                blocks = [list(range(start, start + span)) for start in range(0, world, span)]
                self.groups[span], _ = dist.new_subgroups_by_enumeration(blocks, timeout=self.layout.timeout)
        group = self.groups[span]
        parts = [torch.empty_like(tensor) for _ in range(span)]
        with collective("routing-group all-gather", group):
            dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts)

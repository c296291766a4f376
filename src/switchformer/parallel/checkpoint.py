"""Full (unsharded) model and optimizer states for an expert-parallel model, and loading them back into slices.

A checkpoint always holds what one process holds: ``[E, ...]`` expert weights under the single-process names. An
EP run gathers before saving and slices after loading, so a checkpoint moves freely between one process and
any world size whose expert-parallel degree divides the experts. Gathering is a collective (all ranks call it)
and every rank gets the full state; loading is local (each rank takes its slice).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from switchformer.parallel.collectives import collective
from switchformer.parallel.expert_parallel import ExpertShard, expert_shards
from switchformer.parallel.mesh import ParallelLayout


class ShardMismatchError(ValueError):
    """A full state does not fit the model's expert slices; the message names the key and the shapes."""


def gather_full_state_dict(model: nn.Module, layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every expert slice gathered over the EP group into the full ``[E, ...]`` tensor."""
    shards = expert_shards(model)
    state = model.state_dict()
    for name in state:  # the same order on every rank, so the collectives line up
        if name in shards:
            state[name] = _gather_rows(state[name], layout)
    return state


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], layout: ParallelLayout) -> None:
    """Load a full (single-process) state into an expert-parallel ``model``, each rank taking its expert slices."""
    shards = _checked_shards(model, layout)
    local = dict(state_dict)
    for name, shard in shards.items():
        if name not in state_dict:
            raise ShardMismatchError(f"the full state has no expert weight {name!r}")
        local[name] = _slice_rows(state_dict[name], shard, name)
    model.load_state_dict(local)


def gather_full_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, layout: ParallelLayout
) -> dict[str, Any]:
    """``optimizer.state_dict()`` as one process would have it: per-expert state tensors (Adam moments, factored
    Adafactor statistics: any state tensor whose leading dimension is the slice's experts) gathered over the EP
    group. The optimizer must have been built after :func:`apply_expert_parallel`, over ``model.parameters()``."""
    by_param = _shard_of_param(model)
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):  # the same order on every rank
        shard = by_param.get(id(param))
        if shard is None or index not in state["state"]:
            continue
        # state_dict() shares the live per-parameter dicts: replace them, never write into them.
        entry = dict(state["state"][index])
        state["state"][index] = entry
        for key, value in entry.items():
            if _is_per_expert(value, param):
                entry[key] = _gather_rows(value, layout)
    return state


def load_full_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, state_dict: dict[str, Any], layout: ParallelLayout
) -> None:
    """Load a full optimizer state (from one process or :func:`gather_full_optimizer_state`), slicing per-expert
    tensors to this rank's experts."""
    _checked_shards(model, layout)
    by_param = _shard_of_param(model)
    local = copy.copy(state_dict)
    local["state"] = {index: dict(entry) for index, entry in state_dict["state"].items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        shard = by_param.get(id(param))
        if shard is None or index not in local["state"]:
            continue
        for key, value in local["state"][index].items():
            if isinstance(value, torch.Tensor) and value.dim() == param.dim() and value.dim() > 0:
                local["state"][index][key] = _slice_rows(value, shard, f"optimizer state {index}.{key}")
    optimizer.load_state_dict(local)


def _gather_rows(local: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """Concatenate the EP ranks' ``[L, ...]`` slices in EP-rank order into ``[E, ...]``."""
    if layout.ep_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(layout.ep_size)]
    with collective("checkpoint all-gather of expert weights", layout.ep_group):
        dist.all_gather(parts, local.contiguous(), group=layout.ep_group)
    return torch.cat(parts, 0)


def _slice_rows(full: torch.Tensor, shard: ExpertShard, what: str) -> torch.Tensor:
    if full.dim() == 0 or full.shape[0] != shard.num_experts:
        raise ShardMismatchError(
            f"{what} has shape {tuple(full.shape)}; expected {shard.num_experts} experts in its first dimension "
            "(was the checkpoint saved with another num_experts?)"
        )
    return full[shard.start : shard.stop].clone()


def _is_per_expert(value: Any, param: torch.Tensor) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == param.dim()
        and value.dim() > 0
        and value.shape[0] == param.shape[0]
    )


def _shard_of_param(model: nn.Module) -> dict[int, ExpertShard]:
    shards = expert_shards(model)
    return {id(param): shards[name] for name, param in model.named_parameters() if name in shards}


def _checked_shards(model: nn.Module, layout: ParallelLayout) -> dict[str, ExpertShard]:
    shards = expert_shards(model)
    for name, shard in shards.items():
        if (shard.ep_rank, shard.ep_size) != (layout.ep_rank, layout.ep_size):
            raise ShardMismatchError(
                f"{name} holds expert slice {shard.ep_rank}/{shard.ep_size}, but this rank's layout is "
                f"{layout.ep_rank}/{layout.ep_size}; apply_expert_parallel with the same layout first"
            )
    return shards

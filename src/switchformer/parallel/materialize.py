"""Allocate a parallelised meta-device model's local shards and fill them with the layout-independent initial
weights: the block of each weight a rank holds gets exactly the values the single-process model has there."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from switchformer.layers.initialization import seeded_fill_
from switchformer.models.base import SwitchModelBase


def local_block(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The tensor this process holds of ``param`` and where it starts in the whole weight (one index per dim).

    Every layout here gives a rank one contiguous block of each weight (experts split on dim 0, FSDP shards on
    dim 0, or on dim 1 for expert slices of fewer experts than shards)."""
    if not isinstance(param, DTensor):
        return param.data, (0,) * param.dim()
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), tuple(int(o) for o in offset)


@torch.no_grad()
def materialize(model: SwitchModelBase, device: torch.device, *, seed: int) -> SwitchModelBase:
    """``model.to_empty(device)``, then each parameter's local rows from its seeded stream (see
    :func:`switchformer.layers.initialization.seeded_fill_`): the same model as ``build_model(config, seed=seed)``
    in one process, for any layout."""
    model.to_empty(device=device)
    rules = model.init_rules()
    for name, param in model.named_parameters():
        local, offset = local_block(param)
        seeded_fill_(local, rules[name], seed=seed, name=name, global_shape=param.shape, offset=offset)
    return model

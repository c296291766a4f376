"""Allocate a parallelised meta-device model's local shards and fill them with the layout-independent initial
weights: the rows a rank holds get exactly the values the single-process model has in those rows."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from switchformer.layers.initialization import seeded_fill_
from switchformer.models.base import SwitchModelBase


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor this process holds of ``param`` and the global row (dim 0) where it starts.

    Every layout here splits weights along dim 0 only (experts, then FSDP shards), so a rank's part of a weight is a
    contiguous block of rows.
    """
    if not isinstance(param, DTensor):
        return param.data, 0
    local = param.to_local()
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if any(offset[1:]):
        raise ValueError(f"a shard of a {tuple(param.shape)} weight starts at {offset}: only dim 0 may be split")
    return local, int(offset[0]) if len(offset) else 0


@torch.no_grad()
def materialize(model: SwitchModelBase, device: torch.device, *, seed: int) -> SwitchModelBase:
    """``model.to_empty(device)``, then each parameter's local rows from its seeded stream (see
    :func:`switchformer.layers.initialization.seeded_fill_`): the same model as ``build_model(config, seed=seed)``
    in one process, for any layout."""
    model.to_empty(device=device)
    rules = model.init_rules()
    for name, param in model.named_parameters():
        local, row_start = local_rows(param)
        seeded_fill_(local, rules[name], seed=seed, name=name, global_shape=param.shape, row_start=row_start)
    return model

"""Allocate a parallelised meta-device model's local shards and fill them with the layout-independent initial
weights: the block of each weight a rank holds gets exactly the values the single-process model has there."""

from __future__ import annotations

import torch

from switchformer.layers.initialization import seeded_fill_
from switchformer.local_blocks import local_block
from switchformer.models.base import SwitchModelBase


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

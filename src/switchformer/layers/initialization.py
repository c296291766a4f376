"""The paper's reduced-scale initialisation (section 2.3)."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def scaled_trunc_normal_(tensor: torch.Tensor, *, scale: float, fan_in: int) -> torch.Tensor:
    """Truncated normal (at two standard deviations), mean 0, std ``sqrt(scale / fan_in)``.

    The paper cut the default Transformer scale from 1.0 to 0.1, which made early training far more stable across
    seeds for sparse models.
    """
    std = math.sqrt(scale / fan_in)
    return torch.nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)

"""The router: a bias-free linear map from a token to one logit per expert, always in float32.

Shape legend: T tokens (flattened batch), D d_model, E experts.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """Turn autocast off for the router; some device types have no autocast to turn off."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # pragma: no cover - exotic device without autocast support
        return contextlib.nullcontext()


class Router(nn.Module):
    """Computes router logits ``h(x) = W_r x`` for each token.

    Selective precision (paper, section 2.4): the router's input and matmul are cast to float32 and autocast is
    disabled around it, so a bf16 model still routes in float32; only the router's result is float32, the experts
    keep the model dtype. Jitter (multiplicative noise in ``[1 - eps, 1 + eps]``) is applied to the router's own
    float32 copy of the input in training, so the experts always see the clean input (unlike the HF port, which
    applies it in place).
    """

    def __init__(self, d_model: int, num_experts: int, *, jitter: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # [E, D], the layout of nn.Linear
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        self.jitter = jitter
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Return float32 logits ``[T, E]``; ``x_TD`` is never modified."""
        with _autocast_disabled(x_TD.device.type):
            x32_TD = x_TD.float()
            if self.training and self.jitter > 0:
                noise_TD = torch.empty_like(x32_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
                x32_TD = x32_TD * noise_TD
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x32_TD, self.weight.float(), bias)

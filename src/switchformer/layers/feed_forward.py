"""The dense T5 feed-forward network, ``wo(dropout(act(wi x)))`` without biases."""

from __future__ import annotations

from torch import Tensor, nn

from switchformer.layers.activation import Activation, apply_activation
from switchformer.layers.initialization import InitKind, InitRule, apply_init_rules


class DenseFFN(nn.Module):
    """One expert's shape run densely: the FLOP-matched baseline for a top-1 Switch layer."""

    def __init__(self, d_model: int, d_ff: int, activation: Activation, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.activation = activation
        self.wi = nn.Linear(d_model, d_ff * activation.input_width_multiplier, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def init_rules(self, *, init_scale: float) -> dict[str, InitRule]:
        return {
            "wi.weight": InitRule(InitKind.SCALED_TRUNC_NORMAL, init_scale, fan_in=self.wi.in_features),
            "wo.weight": InitRule(InitKind.SCALED_TRUNC_NORMAL, init_scale, fan_in=self.wo.in_features),
        }

    def reset_parameters(self, *, init_scale: float) -> None:
        apply_init_rules(self, self.init_rules(init_scale=init_scale))

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.dropout(apply_activation(self.wi(x), self.activation, inplace=True)))

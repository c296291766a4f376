"""Feed-forward activations shared by the dense FFN and the experts."""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F


class Activation(enum.Enum):
    RELU = "relu"  # T5.1.0 and the Switch-Base/Large checkpoints
    GELU = "gelu"  # exact (erf) GELU
    GATED_GELU = "gated-gelu"  # T5.1.1 / Switch-XXL: gelu_tanh(x W0) * (x W1)
    GATED_SILU = "gated-silu"  # SwiGLU

    @property
    def is_gated(self) -> bool:
        return self in (Activation.GATED_GELU, Activation.GATED_SILU)

    @property
    def input_width_multiplier(self) -> int:
        """Gated activations need two input projections, fused into one matrix of twice the width."""
        return 2 if self.is_gated else 1


def apply_activation(h: torch.Tensor, activation: Activation, *, inplace: bool = False) -> torch.Tensor:
    """Apply ``activation`` to the output of the input projection (``[..., d_ff * multiplier]``).

    ``inplace``: ``h`` is a fresh buffer nothing else reads, which ReLU may overwrite (its backward needs only its
    output): no second ``[..., d_ff]`` buffer to allocate and fill.
    """
    if activation is Activation.RELU:
        return F.relu(h, inplace=inplace)
    if activation is Activation.GELU:
        return F.gelu(h)
    gate, linear = h.chunk(2, dim=-1)
    if activation is Activation.GATED_GELU:
        return F.gelu(gate, approximate="tanh") * linear
    return F.silu(gate) * linear

"""Stacked expert feed-forward networks, run as batched or grouped matmuls.

Shape legend: E experts, C rows per expert (capacity), R rows in all, D d_model, F d_ff, M activation width
multiplier (2 for gated activations).
"""

from __future__ import annotations

import dataclasses
import enum

import torch
from torch import nn

from switchformer.layers.activation import Activation, apply_activation
from switchformer.layers.initialization import InitKind, InitRule, apply_init_rules


class Layout(enum.Enum):
    PADDED = "padded"  # rows == E * capacity; expert e owns rows [e * capacity, (e + 1) * capacity)
    GROUPED = "grouped"  # rows sorted by expert; expert e owns tokens_per_expert[e] consecutive rows


@dataclasses.dataclass
class ExpertBatch:
    """Token rows arranged for the experts (what a dispatcher hands over)."""

    rows: torch.Tensor  # [R, D]
    layout: Layout
    capacity: int  # PADDED: rows per expert; GROUPED: unused (0)
    tokens_per_expert: torch.Tensor  # [E] int64 GROUPED: rows of each expert (rows past their sum are ignored)


def local_part(weight: torch.Tensor) -> torch.Tensor:
    """The experts this process holds: a DTensor's local shard when expert parallelism split the stack from outside
    the model (``switchformer.parallel``), the weight itself otherwise."""
    return weight.to_local() if hasattr(weight, "to_local") else weight


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``torch._grouped_mm`` needs 16-byte aligned rows and, on older builds, may be missing."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    elem = x.element_size()
    return all((dim * elem) % 16 == 0 for dim in weight.shape[1:])


class GroupedExperts(nn.Module):
    """``E`` feed-forward experts ``wo(dropout(act(wi x)))`` with weights stacked as ``[E, D, M*F]`` and ``[E, F, D]``.

    Stacked weights let all experts run in one batched matmul (or grouped GEMM), and keep the backward free of
    per-expert full-size gradient buffers that slicing a stacked parameter in a Python loop would allocate.
    """

    def __init__(
        self, num_experts: int, d_model: int, d_ff: int, activation: Activation, *, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        self.wi = nn.Parameter(torch.empty(num_experts, d_model, d_ff * activation.input_width_multiplier))
        self.wo = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters(init_scale=1.0)

    def init_rules(self, *, init_scale: float) -> dict[str, InitRule]:
        """Each expert drawn on its own (``per_expert``), so a rank holding some experts draws only those."""
        rule = InitKind.SCALED_TRUNC_NORMAL
        return {
            "wi": InitRule(rule, init_scale, fan_in=self.d_model, per_expert=True),
            "wo": InitRule(rule, init_scale, fan_in=self.d_ff, per_expert=True),
        }

    def reset_parameters(self, *, init_scale: float) -> None:
        apply_init_rules(self, self.init_rules(init_scale=init_scale))

    def forward(self, batch: ExpertBatch) -> torch.Tensor:
        """Apply each expert to its rows; returns ``[R, D]`` in the same arrangement."""
        rows_RD = batch.rows
        wi, wo = local_part(self.wi), local_part(self.wo)
        if torch.is_autocast_enabled(rows_RD.device.type):
            # bmm autocasts by itself, grouped_mm does not: cast explicitly so both paths run in the low precision.
            dtype = torch.get_autocast_dtype(rows_RD.device.type)
            rows_RD, wi, wo = rows_RD.to(dtype), wi.to(dtype), wo.to(dtype)
        elif rows_RD.dtype != wi.dtype:
            rows_RD = rows_RD.to(wi.dtype)
        if batch.layout is Layout.PADDED:
            x_ECD = rows_RD.view(self.num_experts, batch.capacity, self.d_model)
            dropout = self.dropout.p if self.training else 0.0
            return _PaddedExperts.apply(x_ECD, wi, wo, self.activation, dropout).view(-1, self.d_model)
        return self._grouped(rows_RD, wi, wo, batch.tokens_per_expert)

    def _grouped(
        self, rows_RD: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, tokens_per_expert: torch.Tensor
    ) -> torch.Tensor:
        if grouped_mm_supported(rows_RD, wi) and grouped_mm_supported(rows_RD, wo):
            offsets = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
            # grouped_mm never writes the rows past the last offset (the rows of dropped claims), in its output or
            # in its input's gradient: on CUDA they hold whatever memory held before, inf and NaN included. Select
            # (never multiply) zeros there, on the way in and out, so neither direction can carry that memory on.
            counted_R1 = (torch.arange(rows_RD.shape[0], device=rows_RD.device) < offsets[-1])[:, None]
            rows_RD = torch.where(counted_R1, rows_RD, 0)
            h_RF = self.dropout(apply_activation(torch._grouped_mm(rows_RD, wi, offs=offsets), self.activation))
            return torch.where(counted_R1, torch._grouped_mm(h_RF, wo, offs=offsets), 0)
        # Portable fallback: one matmul per expert over its slice of rows (needs the counts on the host).
        counts = tokens_per_expert.tolist()
        outputs, start = [], 0
        for expert, (wi_e, wo_e) in enumerate(zip(wi.unbind(0), wo.unbind(0), strict=True)):
            stop = start + counts[expert]
            h = self.dropout(apply_activation(rows_RD[start:stop] @ wi_e, self.activation))
            outputs.append(h @ wo_e)
            start = stop
        outputs.append(rows_RD.new_zeros(rows_RD.shape[0] - start, self.d_model))
        return torch.cat(outputs, 0)


class _PaddedExperts(torch.autograd.Function):
    """``bmm(dropout(act(bmm(x, wi))), wo)`` over ``[E, C, *]`` buffers, with a leaner backward than autograd's.

    Saves ``x`` and one ``[E, C, M*F]`` tensor: ReLU's output (it also tells where the input was positive, and where
    dropout struck), or else the activation's input, re-activated in backward (cheap next to the matmuls). The
    activation's and dropout's gradients are taken in place in the matmul's output, so the backward's peak holds
    two ``[E, C, F]`` buffers where autograd holds three, and no extra gradient buffer is allocated.
    """

    @staticmethod
    def forward(
        ctx, x_ECD: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, activation: Activation, dropout: float
    ) -> torch.Tensor:
        a_ECF = torch.bmm(x_ECD, wi)
        keep_ECF = None
        if dropout:  # dropout's mask, drawn from the global generator as nn.Dropout would
            keep_ECF = torch.rand((*a_ECF.shape[:-1], wo.shape[1]), device=a_ECF.device) >= dropout
        if activation is Activation.RELU:
            h_ECF = a_ECF.relu_()
            if keep_ECF is not None:
                h_ECF.mul_(keep_ECF).mul_(1.0 / (1.0 - dropout))
            ctx.save_for_backward(x_ECD, wi, wo, h_ECF, None)
        else:
            h_ECF = _dropout(apply_activation(a_ECF, activation), keep_ECF, dropout)
            ctx.save_for_backward(x_ECD, wi, wo, a_ECF, keep_ECF)
        ctx.activation, ctx.dropout = activation, dropout
        return torch.bmm(h_ECF, wo)

    @staticmethod
    def backward(ctx, grad_ECD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_ECD, wi, wo, saved_ECF, keep_ECF = ctx.saved_tensors
        activation, dropout = ctx.activation, ctx.dropout
        relu = activation is Activation.RELU
        h_ECF = saved_ECF if relu else _dropout(apply_activation(saved_ECF, activation), keep_ECF, dropout)
        grad_wo = torch.bmm(h_ECF.transpose(1, 2), grad_ECD) if ctx.needs_input_grad[2] else None
        grad_h_ECF = torch.bmm(grad_ECD, wo.transpose(1, 2))
        if relu:  # zero where ReLU or dropout zeroed the output (in place), scale what dropout kept
            grad_a_ECF = torch.ops.aten.threshold_backward.grad_input(grad_h_ECF, h_ECF, 0, grad_input=grad_h_ECF)
            if dropout:
                grad_a_ECF.mul_(1.0 / (1.0 - dropout))
        else:
            del h_ECF
            grad_a_ECF = _activation_backward(_dropout(grad_h_ECF, keep_ECF, dropout), saved_ECF, activation)
        grad_wi = torch.bmm(x_ECD.transpose(1, 2), grad_a_ECF) if ctx.needs_input_grad[1] else None
        grad_x = torch.bmm(grad_a_ECF, wi.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        return grad_x, grad_wi, grad_wo, None, None


def _dropout(h: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    return h if keep is None else h * keep * (1.0 / (1.0 - p))


def _activation_backward(grad_h: torch.Tensor, a: torch.Tensor, activation: Activation) -> torch.Tensor:
    """Gradient w.r.t. the activation's input ``a`` (``[..., M*F]``) from that w.r.t. its output (not ReLU)."""
    aten = torch.ops.aten
    if activation is Activation.GELU:
        return aten.gelu_backward(grad_h, a, approximate="none")
    gate, linear = a.chunk(2, dim=-1)
    if activation is Activation.GATED_GELU:
        act = torch.nn.functional.gelu(gate, approximate="tanh")
        grad_gate = aten.gelu_backward(grad_h * linear, gate, approximate="tanh")
    else:
        act = torch.nn.functional.silu(gate)
        grad_gate = aten.silu_backward(grad_h * linear, gate)
    return torch.cat([grad_gate, grad_h * act], dim=-1)

"""Stacked expert feed-forward networks, run as batched, grouped or per-expert matmuls.

Shape legend: E experts, C rows per expert (capacity), R rows in all, D d_model, F d_ff, M activation width
multiplier (2 for gated activations); X and Y the inner and outer width of one of the two products.
"""

from __future__ import annotations

import dataclasses
import enum

import torch
from torch import nn

from switchformer.layers.activation import Activation, apply_activation
from switchformer.layers.initialization import InitKind, InitRule, apply_init_rules
from switchformer.layers.prepacked import PrepackedWeights


class Layout(enum.Enum):
    PADDED = "padded"  # rows == E * capacity; expert e owns rows [e * capacity, (e + 1) * capacity); torch.bmm
    GROUPED = "grouped"  # rows sorted by expert; expert e owns tokens_per_expert[e] consecutive rows; grouped GEMM
    LOOPED = "looped"  # as GROUPED, exactly the kept claims' rows; one matmul per expert holding rows (host counts)


@dataclasses.dataclass
class ExpertBatch:
    """Token rows arranged for the experts (what a dispatcher hands over)."""

    rows: torch.Tensor  # [R, D]
    layout: Layout
    capacity: int  # PADDED: rows per expert; GROUPED, LOOPED: unused (0)
    tokens_per_expert: torch.Tensor  # [E] int64 GROUPED, LOOPED: rows of each expert (rows past their sum are zero)


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
            return _ExpertFFN.apply(x_ECD, wi, wo, self.activation, dropout).view(-1, self.d_model)
        if batch.layout is Layout.LOOPED:  # the counts are read on the host: no device to wait for on CPU
            return self.looped(rows_RD, wi, wo, batch.tokens_per_expert.tolist())
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
        # Portable fallback: the looped layout's kernel over the same rows (needs the counts on the host).
        return self.looped(rows_RD, wi, wo, tokens_per_expert.tolist())

    def looped(
        self,
        rows_RD: torch.Tensor,
        wi: torch.Tensor,
        wo: torch.Tensor,
        counts: list[int],
        packed: PrepackedWeights | None = None,
    ) -> torch.Tensor:
        """The experts over rows sorted by expert, ``counts[e]`` of them expert ``e``'s: one matmul per expert
        holding rows (with ``packed``, by its packed copies: inference only)."""
        dropout = self.dropout.p if self.training else 0.0
        return _ExpertFFN.apply(rows_RD, wi, wo, self.activation, dropout, _PerExpertMatmuls(counts, packed))


class _BatchedMatmuls:
    """The padded layout's products: ``[E, C, *]`` buffers, one batched matmul each."""

    @staticmethod
    def product(x_ECX: torch.Tensor, w_EXY: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x_ECX, w_EXY)

    @staticmethod
    def weight_grad(x_ECX: torch.Tensor, grad_ECY: torch.Tensor, like_w: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x_ECX.transpose(1, 2), grad_ECY)


@dataclasses.dataclass
class _PerExpertMatmuls:
    """The looped layout's products: expert ``e`` owns ``counts[e]`` consecutive rows of a ``[R, *]`` tensor.

    One matmul per expert that holds rows, written in place into one output: an expert without rows is never
    read, and rows past the counts' sum are zero. Slicing the weights here, inside an autograd function, allocates
    no per-expert full-size gradient (the backward writes each expert's slice of one gradient tensor).
    """

    counts: list[int]
    packed: PrepackedWeights | None = None  # inference: multiply by the experts' packed copies (layers.prepacked)

    def product(self, x_RX: torch.Tensor, w_EXY: torch.Tensor) -> torch.Tensor:
        out_RY = x_RX.new_empty(x_RX.shape[0], w_EXY.shape[-1])
        start = 0
        for expert, count in enumerate(self.counts):
            rows = slice(start, start + count)
            if count and self.packed is not None:
                out_RY[rows] = self.packed.expert_product(x_RX[rows], w_EXY, expert)
            elif count:
                torch.mm(x_RX[rows], w_EXY[expert], out=out_RY[rows])
            start += count
        out_RY[start:].zero_()
        return out_RY

    def weight_grad(self, x_RX: torch.Tensor, grad_RY: torch.Tensor, like_w: torch.Tensor) -> torch.Tensor:
        grad_EXY = torch.empty_like(like_w, dtype=grad_RY.dtype)
        start = 0
        for expert, count in enumerate(self.counts):
            rows = slice(start, start + count)
            if count:
                torch.mm(x_RX[rows].t(), grad_RY[rows], out=grad_EXY[expert])
            else:
                grad_EXY[expert].zero_()
            start += count
        return grad_EXY


class _ExpertFFN(torch.autograd.Function):
    """``wo(dropout(act(wi x)))`` per expert, over the padded layout's ``[E, C, *]`` buffers (batched matmuls, the
    default) or the looped layout's sorted rows (``matmuls=_PerExpertMatmuls(counts)``), with a leaner backward
    than autograd's.

    Saves ``x`` and one ``[..., M*F]`` tensor: ReLU's output (it also tells where the input was positive, and where
    dropout struck), or else the activation's input, re-activated in backward (cheap next to the matmuls). The
    activation's and dropout's gradients are taken in place in the matmul's output, so the backward's peak holds
    two ``[..., F]`` buffers where autograd holds three, and no extra gradient buffer is allocated.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        wi: torch.Tensor,
        wo: torch.Tensor,
        activation: Activation,
        dropout: float,
        matmuls: type[_BatchedMatmuls] | _PerExpertMatmuls = _BatchedMatmuls,
    ) -> torch.Tensor:
        a = matmuls.product(x, wi)
        keep = None
        if dropout:  # dropout's mask, drawn from the global generator as nn.Dropout would
            keep = torch.rand((*a.shape[:-1], wo.shape[1]), device=a.device) >= dropout
        if activation is Activation.RELU:
            h = a.relu_()
            if keep is not None:
                h.mul_(keep).mul_(1.0 / (1.0 - dropout))
            ctx.save_for_backward(x, wi, wo, h, None)
        else:
            h = _dropout(apply_activation(a, activation), keep, dropout)
            ctx.save_for_backward(x, wi, wo, a, keep)
        ctx.activation, ctx.dropout, ctx.matmuls = activation, dropout, matmuls
        return matmuls.product(h, wo)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, wi, wo, saved, keep = ctx.saved_tensors
        activation, dropout, matmuls = ctx.activation, ctx.dropout, ctx.matmuls
        relu = activation is Activation.RELU
        h = saved if relu else _dropout(apply_activation(saved, activation), keep, dropout)
        grad_wo = matmuls.weight_grad(h, grad, wo) if ctx.needs_input_grad[2] else None
        grad_h = matmuls.product(grad, wo.transpose(1, 2))
        if relu:  # zero where ReLU or dropout zeroed the output (in place), scale what dropout kept
            grad_a = torch.ops.aten.threshold_backward.grad_input(grad_h, h, 0, grad_input=grad_h)
            if dropout:
                grad_a.mul_(1.0 / (1.0 - dropout))
        else:
            del h
            grad_a = _activation_backward(_dropout(grad_h, keep, dropout), saved, activation)
        grad_wi = matmuls.weight_grad(x, grad_a, wi) if ctx.needs_input_grad[1] else None
        grad_x = matmuls.product(grad_a, wi.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        return grad_x, grad_wi, grad_wo, None, None, None


_PaddedExperts = _ExpertFFN  # with its default matmuls: the padded layout's kernel


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

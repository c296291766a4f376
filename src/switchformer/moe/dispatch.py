"""Token dispatchers: move tokens to their experts' rows and the results back, weighted by the gate.

:class:`TokenDispatcher` is the interface :class:`~switchformer.moe.layer.SwitchFFN` talks to. The local one here is
parameter-free and index-based: tokens are gathered into expert rows (never through a dense one-hot
``[tokens, experts, capacity]`` tensor), and results are gathered back. Expert parallelism
(``switchformer.parallel``) swaps in a dispatcher with all-to-all in between, from outside the model.

Shape legend: T tokens, K choices per token, E experts, G routing groups, R expert rows, D d_model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import torch

from switchformer.moe.assignment import Routing
from switchformer.moe.config import ExpertKernel
from switchformer.moe.experts import ExpertBatch, Layout


@runtime_checkable
class TokenDispatcher(Protocol):
    """Moves a layer's tokens to expert rows and the experts' results back; holds no parameters.

    ``dispatch`` returns the rows for the layer's (local) experts and an opaque state; ``combine`` takes the
    experts' output rows and that state and returns ``sum_k gate_k * E_k(x)`` per token (zero for dropped claims).
    """

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[ExpertBatch, Any]: ...

    def combine(self, y_RD: torch.Tensor, routing: Routing, state: Any) -> torch.Tensor: ...


@dataclasses.dataclass
class DispatchState:
    """What ``combine`` needs to undo ``dispatch``."""

    row_of_claim: torch.Tensor  # [T, K] expert row holding each claim's result; R (a zero row) when dropped


def choose_layout(kernel: ExpertKernel, device: torch.device) -> Layout:
    """The layout of one call: the kernel's, or for ``kernel='auto'`` one whose cost follows the kept tokens and
    that adds no device sync.

    CUDA takes grouped GEMM (offsets on the device). CPU code traced by ``torch.compile`` takes the padded layout:
    its size is static (no graph break with a capacity), and grouped GEMM's tracing (meta) kernel accepts only
    bfloat16 there. Eager CPU code takes the looped layout: reading the counts is no sync on the CPU (there is no
    queue of device work to wait for), and then each expert computes exactly its kept rows and an expert without
    tokens is never read, so the cost follows the tokens, not the capacity (``bench/bench_generation.py``).
    """
    if kernel is ExpertKernel.PADDED_BMM:
        return Layout.PADDED
    if kernel is ExpertKernel.GROUPED_MM:
        return Layout.GROUPED
    if kernel is ExpertKernel.LOOP:
        return Layout.LOOPED
    if device.type == "cuda":
        return Layout.GROUPED
    if torch.compiler.is_compiling():
        return Layout.PADDED
    return Layout.LOOPED


@dataclasses.dataclass
class RowArrangement:
    """Where each kept claim sits among the expert rows (what :func:`arrange_rows` decides)."""

    row_of_claim: torch.Tensor  # [T, K] int64 expert row of each claim; num_rows (past the end) when dropped
    tokens_per_expert: torch.Tensor  # [E] int64 kept claims per expert
    rows_per_expert: int  # PADDED: rows each expert owns (kept claims first, then empty rows); otherwise 0
    num_rows: int  # R, the rows the experts compute
    layout: Layout  # the layout asked for, or GROUPED where a skewed dropless batch would pad too much


def arrange_rows(
    expert_index_TK: torch.Tensor,
    keep_TK: torch.Tensor,
    group_T: torch.Tensor,
    position_TK: torch.Tensor,
    *,
    num_experts: int,
    num_groups: int,
    capacity: int | None,
    layout: Layout,
) -> RowArrangement:
    """Give each kept claim an expert row.

    Within an expert, rows follow group order and, inside a group, slot order, so no slot is left empty between
    claims. The padded layout gives every expert the rows its busiest case can need: ``num_groups * capacity``,
    but never more than the ``T`` tokens (a token claims an expert at most once), so a batch of short groups (a
    decoding step) does not pay for a capacity it cannot fill; in dropless mode it is the busiest expert's count,
    which needs one host sync. A dropless batch so skewed that padding would more than double the rows falls back
    to the grouped layout, which never pads (except under ``torch.compile`` on CPU). The looped layout has exactly
    the kept claims' rows (their count is read on the host); the grouped one has a row for every claim.
    """
    num_tokens, k = expert_index_TK.shape
    device = expert_index_TK.device
    num_segments = num_groups * num_experts
    segment_TK = torch.where(keep_TK, group_T[:, None] * num_experts + expert_index_TK, num_segments)
    counts_S = torch.zeros(num_segments + 1, dtype=torch.long, device=device)
    counts_S.scatter_add_(0, segment_TK.reshape(-1), torch.ones_like(segment_TK).reshape(-1))
    counts_GE = counts_S[:num_segments].view(num_groups, num_experts)
    before_GE = torch.cumsum(counts_GE, 0) - counts_GE  # rows used by earlier groups, per expert
    tokens_per_expert_E = counts_GE.sum(0)
    row_in_expert_TK = before_GE[group_T[:, None], expert_index_TK] + position_TK

    rows_per_expert = 0
    if layout is Layout.PADDED:
        if capacity is not None:
            rows_per_expert = min(num_groups * capacity, num_tokens)
        else:
            rows_per_expert = max(int(tokens_per_expert_E.max().item()), 1)
            # (not while torch.compile traces CPU code: see choose_layout)
            compiling_on_cpu = torch.compiler.is_compiling() and device.type == "cpu"
            if num_experts * rows_per_expert > 2 * num_tokens * k and not compiling_on_cpu:
                layout = Layout.GROUPED
    if layout is Layout.PADDED:
        num_rows = num_experts * rows_per_expert
        row_TK = expert_index_TK * rows_per_expert + row_in_expert_TK
    else:
        num_rows = int(tokens_per_expert_E.sum()) if layout is Layout.LOOPED else num_tokens * k
        start_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
        row_TK = start_E[expert_index_TK] + row_in_expert_TK
    row_TK = torch.where(keep_TK, row_TK, num_rows)
    return RowArrangement(row_TK, tokens_per_expert_E, rows_per_expert, num_rows, layout)


class LocalDispatcher(TokenDispatcher):
    """Dispatch within one process: gather token rows for ``E`` local experts and gather their results back.

    Both directions are gathers, forward and backward (see :class:`_GatherRows` and :class:`_CombineClaims`): a
    scatter-add (``index_select``'s autograd backward) runs far slower on CPU, worst with several threads.
    """

    def __init__(self, num_experts: int, kernel: ExpertKernel = ExpertKernel.AUTO) -> None:
        self.num_experts = num_experts
        self.kernel = kernel

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[ExpertBatch, DispatchState]:
        num_tokens, k = routing.expert_index.shape
        rows = arrange_rows(
            routing.expert_index,
            routing.keep,
            routing.group_index,
            routing.position,
            num_experts=self.num_experts,
            num_groups=routing.num_groups,
            capacity=routing.capacity,
            layout=choose_layout(self.kernel, x_TD.device),
        )
        # Each row names its source token; empty rows (and dropped claims, parked at row R) name token T (zeros).
        token_C = torch.arange(num_tokens, device=x_TD.device).repeat_interleave(k)
        row_token = torch.full((rows.num_rows + 1,), num_tokens, dtype=torch.long, device=x_TD.device)
        row_token.scatter_(0, rows.row_of_claim.reshape(-1), token_C)
        rows_RD = _GatherRows.apply(x_TD, row_token[: rows.num_rows], rows.row_of_claim)
        batch = ExpertBatch(
            rows=rows_RD, layout=rows.layout, capacity=rows.rows_per_expert, tokens_per_expert=rows.tokens_per_expert
        )
        return batch, DispatchState(row_of_claim=rows.row_of_claim)

    def combine(self, y_RD: torch.Tensor, routing: Routing, state: DispatchState) -> torch.Tensor:
        """``sum_k gate_k * E_k(x)`` per token; dropped claims (row R) add nothing."""
        return _CombineClaims.apply(y_RD, routing.gate, state.row_of_claim)


def _sum_claims(rows_RD: torch.Tensor, row_of_claim_TK: torch.Tensor, weight_TK: torch.Tensor | None) -> torch.Tensor:
    """``sum_k weight[t, k] * rows[row_of_claim[t, k]]`` (weight 1 if None); claims at row R (dropped) give 0."""
    num_tokens, k = row_of_claim_TK.shape
    num_rows, d_model = rows_RD.shape
    if num_rows == 0:
        return rows_RD.new_zeros(num_tokens, d_model)
    row_C = row_of_claim_TK.reshape(-1)
    picked_CD = rows_RD.index_select(0, row_C.clamp(max=num_rows - 1))
    # A multiply by a [C, 1] weight vectorises; masked_fill_ with a broadcast mask ran ~7x slower on CPU.
    kept_C = row_C != num_rows
    weight_C = kept_C.to(rows_RD.dtype) if weight_TK is None else weight_TK.reshape(-1).to(rows_RD.dtype) * kept_C
    picked_CD.mul_(weight_C[:, None])
    return picked_CD if k == 1 else picked_CD.view(num_tokens, k, d_model).sum(1)


class _GatherRows(torch.autograd.Function):
    """``rows[r] = x[token_of_row[r]]``, zero where ``token_of_row[r] == T`` (an empty row).

    Every claim owns a distinct row, so the backward is a gather too: ``grad_x[t] = sum_k grad_rows[row(t, k)]``.
    Saves only the ``[T, K]`` row index.
    """

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, token_of_row_R: torch.Tensor, row_of_claim_TK: torch.Tensor) -> torch.Tensor:
        num_tokens = x_TD.shape[0]
        ctx.save_for_backward(row_of_claim_TK)
        if num_tokens == 0:
            return x_TD.new_zeros(token_of_row_R.shape[0], x_TD.shape[1])
        rows_RD = x_TD.index_select(0, token_of_row_R.clamp(max=num_tokens - 1))
        return rows_RD.mul_((token_of_row_R != num_tokens).to(rows_RD.dtype)[:, None])

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (row_of_claim_TK,) = ctx.saved_tensors
        return _sum_claims(grad_RD.contiguous(), row_of_claim_TK, None), None, None


class _CombineClaims(torch.autograd.Function):
    """``out[t] = sum_k gate[t, k] * y[row(t, k)]``, with gathers in both directions.

    Backward: the row holding claim ``(t, k)`` gets ``gate[t, k] * grad_out[t]`` (rows holding no claim get 0) and
    ``grad_gate[t, k] = <grad_out[t], y[row(t, k)]>``, re-gathered from the saved ``y`` rather than kept per claim.
    """

    @staticmethod
    def forward(ctx, y_RD: torch.Tensor, gate_TK: torch.Tensor, row_of_claim_TK: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y_RD, gate_TK, row_of_claim_TK)
        return _sum_claims(y_RD, row_of_claim_TK, gate_TK)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        y_RD, gate_TK, row_of_claim_TK = ctx.saved_tensors
        num_tokens, k = row_of_claim_TK.shape
        num_rows, d_model = y_RD.shape
        if num_tokens == 0 or num_rows == 0:
            return torch.zeros_like(y_RD), torch.zeros_like(gate_TK), None
        grad_TD = grad_TD.contiguous()
        num_claims = num_tokens * k
        row_C = row_of_claim_TK.reshape(-1)
        # The claim each row holds (C = none); the extra slot R absorbs the dropped claims.
        claim_R = torch.full((num_rows + 1,), num_claims, dtype=torch.long, device=row_C.device)
        claim_R = claim_R.scatter_(0, row_C, torch.arange(num_claims, device=row_C.device))[:num_rows]
        weight_C = gate_TK.reshape(-1).to(grad_TD.dtype).masked_fill(row_C == num_rows, 0)
        weight_R = torch.cat([weight_C, weight_C.new_zeros(1)]).index_select(0, claim_R)
        token_R = torch.div(claim_R, k, rounding_mode="floor").clamp(max=num_tokens - 1)
        grad_y_RD = grad_TD.index_select(0, token_R).mul_(weight_R[:, None])
        picked_TKD = _sum_claims(y_RD, row_C[:, None], None).view(num_tokens, k, d_model)  # zero when dropped
        grad_gate_TK = (picked_TKD * grad_TD[:, None, :]).sum(-1, dtype=torch.float32).to(gate_TK.dtype)
        return grad_y_RD, grad_gate_TK, None

"""The local token dispatcher: move tokens to their experts' rows and the results back, weighted by the gate.

Parameter-free and index-based: tokens are gathered into expert rows (never through a dense one-hot
``[tokens, experts, capacity]`` tensor), and results are gathered back. An expert-parallel dispatcher
(``switchformer.parallel``) offers the same ``dispatch``/``combine`` interface with all-to-all in between.

Shape legend: T tokens, K choices per token, E experts, G routing groups, R expert rows, D d_model.
"""

from __future__ import annotations

import dataclasses

import torch

from switchformer.experts.experts import ExpertBatch, Layout
from switchformer.routing.assignment import Routing
from switchformer.routing.config import ExpertKernel


@dataclasses.dataclass
class DispatchState:
    """What ``combine`` needs to undo ``dispatch``."""

    row_of_claim: torch.Tensor  # [T, K] expert row holding each claim's result; R (a zero row) when dropped


def choose_layout(kernel: ExpertKernel, device: torch.device) -> Layout:
    """Grouped GEMM where it is tuned (CUDA), capacity-padded bmm on CPU (measured fastest there)."""
    if kernel is ExpertKernel.PADDED_BMM:
        return Layout.PADDED
    if kernel is ExpertKernel.GROUPED_MM:
        return Layout.GROUPED
    return Layout.GROUPED if device.type == "cuda" else Layout.PADDED


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
) -> tuple[torch.Tensor, torch.Tensor, int, Layout]:
    """Give each kept claim an expert row; returns ``(row_of_claim_TK, tokens_per_expert_E, rows_per_expert, layout)``.

    Within an expert, rows follow group order and, inside a group, slot order, so no slot is left empty between
    claims. ``rows_per_expert`` is the padded capacity (``num_groups * capacity``); in dropless mode it is the
    busiest expert's count, which needs one host sync. A dropless batch so skewed that padding would more than
    double the rows falls back to the grouped layout, which never pads.
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
            rows_per_expert = num_groups * capacity
        else:
            rows_per_expert = max(int(tokens_per_expert_E.max().item()), 1)
            if num_experts * rows_per_expert > 2 * num_tokens * k:
                layout = Layout.GROUPED
    if layout is Layout.PADDED:
        num_rows = num_experts * rows_per_expert
        row_TK = expert_index_TK * rows_per_expert + row_in_expert_TK
    else:
        num_rows = num_tokens * k
        start_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
        row_TK = start_E[expert_index_TK] + row_in_expert_TK
    row_TK = torch.where(keep_TK, row_TK, num_rows)
    return row_TK, tokens_per_expert_E, rows_per_expert, layout


class LocalDispatcher:
    """Dispatch within one process: gather token rows for ``E`` local experts and gather their results back."""

    def __init__(self, num_experts: int, kernel: ExpertKernel = ExpertKernel.AUTO) -> None:
        self.num_experts = num_experts
        self.kernel = kernel

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[ExpertBatch, DispatchState]:
        num_tokens, k = routing.expert_index.shape
        row_TK, tokens_per_expert_E, rows_per_expert, layout = arrange_rows(
            routing.expert_index,
            routing.keep,
            routing.group_index,
            routing.position,
            num_experts=self.num_experts,
            num_groups=routing.num_groups,
            capacity=routing.capacity,
            layout=choose_layout(self.kernel, x_TD.device),
        )
        num_rows = self.num_experts * rows_per_expert if layout is Layout.PADDED else num_tokens * k
        # Each row names its source token; empty rows (and dropped claims, parked at row R) read a zero row.
        token_C = torch.arange(num_tokens, device=x_TD.device).repeat_interleave(k)
        row_token = torch.full((num_rows + 1,), num_tokens, dtype=torch.long, device=x_TD.device)
        row_token.scatter_(0, row_TK.reshape(-1), token_C)
        x_ext = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[-1])], 0)
        rows_RD = x_ext.index_select(0, row_token[:num_rows])
        batch = ExpertBatch(
            rows=rows_RD, layout=layout, capacity=rows_per_expert, tokens_per_expert=tokens_per_expert_E
        )
        return batch, DispatchState(row_of_claim=row_TK)

    def combine(self, y_RD: torch.Tensor, routing: Routing, state: DispatchState) -> torch.Tensor:
        """``sum_k gate_k * E_k(x)`` per token; dropped claims read the appended zero row, so they add nothing."""
        num_tokens, k = state.row_of_claim.shape
        y_ext = torch.cat([y_RD, y_RD.new_zeros(1, y_RD.shape[-1])], 0)
        picked_CD = y_ext.index_select(0, state.row_of_claim.reshape(-1))
        weight_TK = (routing.gate * routing.keep).to(y_RD.dtype)
        if k == 1:
            return picked_CD * weight_TK
        return (picked_CD.view(num_tokens, k, -1) * weight_TK[..., None]).sum(1)

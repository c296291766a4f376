"""Stacked experts that multiply by their weights' packed copies, for CPU decoding (``layers.prepacked``).

Shape legend: E experts, R rows in all, D d_model, T tokens, K claims per token, C = T * K claims.
"""

from __future__ import annotations

import torch
from torch import nn

from switchformer.layers.activation import apply_activation
from switchformer.layers.prepacked import PrepackedWeights
from switchformer.moe.assignment import Routing
from switchformer.moe.experts import ExpertBatch, GroupedExperts, Layout


class PrepackedExperts(nn.Module):
    """:class:`GroupedExperts` in inference: each expert that holds rows multiplies them by its packed copies, so an
    expert without rows is never read (in every layout; the padded layout's rows are its full capacity)."""

    def __init__(self, experts: GroupedExperts, weights: PrepackedWeights) -> None:
        super().__init__()
        self.experts = experts
        self.weights = weights

    def forward(self, batch: ExpertBatch) -> torch.Tensor:
        experts = self.experts
        if batch.layout is Layout.PADDED:  # expert e's rows are [e * capacity, (e + 1) * capacity)
            counts = [batch.capacity] * experts.num_experts
        else:
            counts = batch.tokens_per_expert.tolist()
        rows_RD = batch.rows.to(experts.wi.dtype)
        return experts.looped(rows_RD, experts.wi, experts.wo, counts, packed=self.weights)


def combined_by_packed_experts(
    experts: GroupedExperts, weights: PrepackedWeights, x_TD: torch.Tensor, routing: Routing
) -> torch.Tensor:
    """``sum_k gate_k * E_k(x)`` per token (zero for dropped claims) by the experts' packed copies, straight from the
    routing record: a decoding step's few tokens, without the dispatcher's row layout and autograd functions, whose
    cost is per call, not per row. The same products of the same rows as the looped layout, so the same values.
    Inference only (no expert dropout)."""
    num_tokens, k = routing.expert_index.shape
    num_experts = experts.num_experts
    claim_expert_C = torch.where(routing.keep, routing.expert_index, num_experts).reshape(-1)
    order_C = torch.argsort(claim_expert_C, stable=True)  # by expert, then token: the looped layout's rows
    counts = torch.bincount(claim_expert_C, minlength=num_experts + 1).tolist()
    gate_C = routing.gate.reshape(-1)
    rows_TD = x_TD.to(experts.wi.dtype)
    y_TD = rows_TD.new_zeros(num_tokens, rows_TD.shape[1])
    start = 0
    for expert, count in enumerate(counts[:num_experts]):
        if count:
            claims = order_C[start : start + count]
            tokens = claims // k
            hidden = weights.expert_product(rows_TD.index_select(0, tokens), experts.wi, expert)
            out = weights.expert_product(apply_activation(hidden, experts.activation), experts.wo, expert)
            y_TD.index_add_(0, tokens, out * gate_C.index_select(0, claims).to(out.dtype)[:, None])
        start += count
    return y_TD

"""Stacked experts that multiply by their weights' packed copies, for CPU decoding (``layers.prepacked``).

Shape legend: E experts, R rows in all, D d_model.
"""

from __future__ import annotations

import torch
from torch import nn

from switchformer.layers.activation import apply_activation
from switchformer.layers.prepacked import PrepackedWeights
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
        rows_RD = batch.rows.to(experts.wi.dtype)
        if batch.layout is Layout.PADDED:
            counts = [batch.capacity] * experts.num_experts
        else:
            counts = batch.tokens_per_expert.tolist()
        out_RD = rows_RD.new_empty(rows_RD.shape)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                h = apply_activation(self.weights.expert_product(rows_RD[rows], experts.wi, expert), experts.activation)
                out_RD[rows] = self.weights.expert_product(h, experts.wo, expert)
            start += count
        out_RD[start:].zero_()
        return out_RD

"""Stacked experts that multiply by their weights' packed copies, for CPU decoding (``layers.prepacked``).

Shape legend: E experts, R rows in all, D d_model.
"""

from __future__ import annotations

import torch
from torch import nn

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
        if batch.layout is Layout.PADDED:  # expert e's rows are [e * capacity, (e + 1) * capacity)
            counts = [batch.capacity] * experts.num_experts
        else:
            counts = batch.tokens_per_expert.tolist()
        rows_RD = batch.rows.to(experts.wi.dtype)
        return experts.looped(rows_RD, experts.wi, experts.wo, counts, packed=self.weights)

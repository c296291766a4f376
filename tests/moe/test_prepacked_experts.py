"""Experts on packed weights give the stored weights' rows in every layout (float32 rounding), padding rows zero."""

from __future__ import annotations

import pytest
import torch

from switchformer.layers.activation import Activation
from switchformer.layers.prepacked import PrepackedWeights
from switchformer.moe.experts import ExpertBatch, GroupedExperts, Layout
from switchformer.moe.prepacked_experts import PrepackedExperts


@pytest.mark.parametrize("layout", list(Layout), ids=[layout.value for layout in Layout])
@pytest.mark.parametrize("activation", [Activation.RELU, Activation.GATED_GELU], ids=["relu", "gated-gelu"])
def test_prepacked_experts_equal_the_stored_weights(layout, activation):
    torch.manual_seed(0)
    experts = GroupedExperts(4, 32, 48, activation).eval()
    counts = torch.tensor([3, 0, 1, 2])  # expert 1 gets no row; two rows past the counts' sum
    if layout is Layout.PADDED:
        batch = ExpertBatch(torch.randn(4 * 3, 32), layout, 3, torch.zeros(4, dtype=torch.long))
    else:
        rows = torch.randn(8, 32)
        rows[6:] = 0
        batch = ExpertBatch(rows, layout, 0, counts)
    with torch.no_grad():
        expected = experts(batch)
        got = PrepackedExperts(experts, PrepackedWeights())(batch)
    torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
    if layout is not Layout.PADDED:
        assert torch.equal(got[6:], torch.zeros(2, 32))

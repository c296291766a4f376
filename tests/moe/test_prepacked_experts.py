"""Experts on packed weights give the stored weights' rows in every layout (float32 rounding), padding rows zero;
combined straight from the routing record they give the Switch layer's output, dropped and top-2 claims included."""

from __future__ import annotations

import pytest
import torch

from switchformer.layers.activation import Activation
from switchformer.layers.prepacked import PrepackedWeights
from switchformer.moe.experts import ExpertBatch, GroupedExperts, Layout
from switchformer.moe.layer import SwitchFFN
from switchformer.moe.prepacked_experts import PrepackedExperts, combined_by_packed_experts


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


@pytest.mark.parametrize("top_k", [1, 2])
def test_experts_combined_from_the_routing_record_equal_the_layer(top_k):
    torch.manual_seed(0)
    layer = SwitchFFN(d_model=32, d_ff=48, num_experts=4, top_k=top_k, expert_capacity=2, dropless=False).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = layer(x)
        x_TD, routing = layer.route_tokens(x)
        got = combined_by_packed_experts(layer.experts, PrepackedWeights(), x_TD, routing).view_as(x)
    dropped = ~routing.keep
    assert dropped.any() and not dropped.all(1).all()  # some claims dropped, some tokens served
    scale = float(out.hidden_states.abs().max())
    torch.testing.assert_close(got, out.hidden_states, atol=1e-5 * scale, rtol=0)
    assert torch.equal(got.view(-1, 32)[dropped.all(1)], torch.zeros(int(dropped.all(1).sum()), 32))

"""Router precision, jitter and the gradient path through the gate."""

from __future__ import annotations

import pytest
import torch

from switchformer import SwitchFFN
from switchformer.config import ConfigError
from switchformer.moe.experts import GroupedExperts


def test_router_logits_stay_float32_under_bf16_autocast_and_bf16_weights():
    layer = SwitchFFN(d_model=16, d_ff=32, num_experts=4)
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.routing.logits.dtype == torch.float32
    assert out.routing.probs.dtype == torch.float32
    assert out.hidden_states.dtype == torch.bfloat16  # the experts ran in the autocast dtype

    layer_bf16 = SwitchFFN(d_model=16, d_ff=32, num_experts=4).to(torch.bfloat16)
    out = layer_bf16(x.to(torch.bfloat16))
    assert out.routing.logits.dtype == torch.float32
    assert out.hidden_states.dtype == torch.bfloat16


def test_router_precision_matches_a_float32_router_under_autocast():
    torch.manual_seed(0)
    layer = SwitchFFN(d_model=64, d_ff=32, num_experts=8, router_jitter=0.0)
    x = torch.randn(4, 16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_autocast = layer.router(x.reshape(-1, 64))
    logits_fp32 = x.reshape(-1, 64) @ layer.router.weight.t()
    torch.testing.assert_close(logits_autocast, logits_fp32, atol=1e-5, rtol=1e-5)


def test_jitter_changes_router_input_but_experts_see_the_clean_input():
    torch.manual_seed(0)
    layer = SwitchFFN(d_model=16, d_ff=32, num_experts=2, router_jitter=0.5, dropless=True, grouping="batch")
    seen = {}

    def capture(module: GroupedExperts, args):
        seen["rows"] = args[0].rows.detach().clone()

    layer.experts.register_forward_pre_hook(capture)
    x = torch.randn(1, 12, 16)
    x_before = x.clone()
    layer.train()
    out = layer(x)
    assert torch.equal(x, x_before), "jitter must not modify the input in place"
    clean_logits = x.reshape(-1, 16) @ layer.router.weight.t()
    assert not torch.allclose(out.routing.logits, clean_logits), "training applies jitter to the router input"
    rows = seen["rows"]
    kept_rows = rows[rows.abs().sum(-1) > 0]
    # every non-empty expert row is exactly one of the clean input tokens
    matches = (kept_rows[:, None, :] == x.reshape(1, -1, 16)).all(-1).any(-1)
    assert matches.all() and kept_rows.shape[0] == 12

    layer.eval()
    out = layer(x)
    torch.testing.assert_close(out.routing.logits, clean_logits, atol=1e-6, rtol=1e-6)


def test_gradient_reaches_the_router_through_the_gate_alone():
    torch.manual_seed(0)
    layer = SwitchFFN(d_model=16, d_ff=32, num_experts=4, router_jitter=0.0)
    out = layer(torch.randn(2, 8, 16))
    out.hidden_states.pow(2).sum().backward()  # no auxiliary loss in this objective
    assert layer.router.weight.grad is not None
    assert layer.router.weight.grad.abs().sum() > 0


def test_router_weight_init_is_small():
    layer = SwitchFFN(d_model=768, d_ff=32, num_experts=8)  # paper scale 0.1: std sqrt(0.1 / 768) ~ 0.0114
    std = float(layer.router.weight.detach().std())
    assert 0.008 < std < 0.013
    # truncated at 2 std of the normal drawn from, whose std is the paper's divided by 0.8796 (Mesh-TF, flaxformer)
    assert float(layer.router.weight.detach().abs().max()) <= 2 * (0.1 / 768) ** 0.5 / 0.87962566103423978 + 1e-6


def _gated_layers(**kwargs):
    """Two Switch layers with identical weights, one per gate."""
    torch.manual_seed(0)
    paper = SwitchFFN(d_model=16, d_ff=32, num_experts=4, router_jitter=0.0, **kwargs)
    straight = SwitchFFN(d_model=16, d_ff=32, num_experts=4, router_jitter=0.0, gate="straight-through", **kwargs)
    straight.load_state_dict(paper.state_dict())
    return paper, straight


def test_straight_through_gate_outputs_the_expert_itself():
    paper, straight = _gated_layers()
    x = torch.randn(2, 8, 16)
    out_paper, out_straight = paper(x), straight(x)
    kept = out_paper.routing.keep[:, 0]
    assert 0 < int(kept.sum()) < kept.numel()  # some tokens dropped: they stay zero under both gates
    p = out_paper.routing.gate[:, 0]
    assert float(p.detach().max()) < 0.9  # the paper's gate shrinks every output
    flat_paper = out_paper.hidden_states.reshape(-1, 16)
    flat_straight = out_straight.hidden_states.reshape(-1, 16)
    torch.testing.assert_close(flat_straight[kept], flat_paper[kept] / p[kept, None], atol=1e-6, rtol=1e-5)
    assert flat_straight[~kept].abs().max() == 0
    torch.testing.assert_close(out_straight.routing.gate[kept], torch.ones(int(kept.sum()), 1))


def test_straight_through_gate_gives_the_router_the_papers_gradient():
    """With a loss linear in the output, dL/dp is E_i(x) . c under both gates, so the router gradients agree;
    the experts' gradients differ by the factor p the paper's gate applies."""
    paper, straight = _gated_layers(capacity_factor=4.0)
    x = torch.randn(2, 8, 16)
    direction = torch.randn(2, 8, 16)
    for layer in (paper, straight):
        (layer(x).hidden_states * direction).sum().backward()
    torch.testing.assert_close(straight.router.weight.grad, paper.router.weight.grad, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(straight.experts.wo.grad, paper.experts.wo.grad)


def test_straight_through_gate_is_refused_for_top_2():
    with pytest.raises(ConfigError, match=r"straight-through.*top_k=1"):
        SwitchFFN(d_model=16, d_ff=32, num_experts=4, top_k=2, gate="straight-through")

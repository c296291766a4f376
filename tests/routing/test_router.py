"""Router precision, jitter and the gradient path through the gate."""

from __future__ import annotations

import torch

from switchformer import SwitchFFN
from switchformer.experts.experts import GroupedExperts


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
    std = float(layer.router.weight.std())
    assert 0.008 < std < 0.013
    assert float(layer.router.weight.abs().max()) <= 2 * (0.1 / 768) ** 0.5 + 1e-6  # truncated at 2 std

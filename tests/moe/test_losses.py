"""Auxiliary losses against values worked out by hand."""

from __future__ import annotations

import math

import torch

from switchformer import MoEConfig
from switchformer.moe.assignment import route
from switchformer.moe.losses import load_balancing_loss, router_stats, router_z_loss


def _routing(logits, grouping="batch", **kwargs):
    cfg = MoEConfig(num_experts=logits.shape[-1], grouping=grouping, **kwargs)
    return route(torch.as_tensor(logits, dtype=torch.float32), cfg, training=True)


def test_load_balancing_loss_by_hand():
    # 4 tokens, 2 experts. probs = softmax(logits):
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    # token probs: [.75,.25] x3 and [.25,.75]; argmax: e0,e0,e0,e1 -> f = [3/4, 1/4]
    # P = mean probs = [(.75*3+.25)/4, (.25*3+.75)/4] = [0.625, 0.375]
    # loss = N * sum f_i P_i = 2 * (0.75*0.625 + 0.25*0.375) = 1.125
    r = _routing(logits)
    assert math.isclose(float(load_balancing_loss(r)), 1.125, rel_tol=1e-6)


def test_load_balancing_loss_uses_pre_capacity_choices():
    logits = torch.tensor([[2.0, 0.0]] * 6)  # all six tokens want expert 0; capacity lets only some through
    r = _routing(logits, capacity_factor=0.5, min_capacity=1)
    assert int(r.keep.sum()) < 6
    p0 = math.exp(2) / (math.exp(2) + 1)
    assert math.isclose(float(load_balancing_loss(r)), 2 * (1.0 * p0), rel_tol=1e-6)  # f = [1, 0]


def test_load_balancing_loss_is_averaged_over_groups():
    a = [[1.0, 0.0], [1.0, 0.0]]  # group 1: both to e0 -> f=[1,0], P0 = s
    b = [[0.0, 1.0], [1.0, 0.0]]  # group 2: f=[.5,.5], P=[.5,.5] -> loss 1
    s = math.exp(1) / (math.exp(1) + 1)
    r = _routing(torch.tensor(a + b), grouping="tokens", group_size=2)
    assert r.num_groups == 2
    assert math.isclose(float(load_balancing_loss(r)), (2 * s + 1.0) / 2, rel_tol=1e-6)


def test_uniform_routing_gives_exactly_one_and_is_the_minimum_for_a_confident_router():
    num_experts = 4
    # Uniform: probabilities all 1/N -> N * sum f_i / N = 1 whatever the argmax is.
    assert math.isclose(float(load_balancing_loss(_routing(torch.zeros(8, num_experts)))), 1.0, rel_tol=1e-6)
    # A confident router (near one-hot probs): loss = N * sum f_i^2, minimal (=1) exactly when f is uniform.
    balanced = torch.eye(num_experts).repeat(2, 1) * 50
    skewed = torch.eye(num_experts)[[0, 0, 0, 1, 1, 2, 3, 0]] * 50
    lb_balanced = float(load_balancing_loss(_routing(balanced)))
    lb_skewed = float(load_balancing_loss(_routing(skewed)))
    assert math.isclose(lb_balanced, 1.0, abs_tol=1e-6)
    f = torch.tensor([4, 2, 1, 1]) / 8
    assert math.isclose(lb_skewed, float(num_experts * (f**2).sum()), rel_tol=1e-5)
    assert lb_skewed > lb_balanced


def test_gradient_descent_on_the_balancing_loss_balances_the_router():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    w = torch.zeros(4, 8)
    w[0] = 1.0  # start collapsed onto expert 0 for tokens with positive x0
    w = (w + 0.1 * torch.randn(4, 8)).requires_grad_(True)
    cfg = MoEConfig(num_experts=4, grouping="batch", dropless=True)
    opt = torch.optim.SGD([w], lr=1.0)
    first = None
    for _ in range(200):
        loss = load_balancing_loss(route(x @ w.t(), cfg, training=True))
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = route(x @ w.t(), cfg, training=True)
    counts = router_stats(final).tokens_per_expert
    assert float(load_balancing_loss(final)) < first
    assert counts.max() / counts.mean() < 1.5


def test_padding_tokens_count_in_no_loss():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, 0.0], [5.0, 0.0]])
    mask = torch.tensor([True, True, False, False])
    cfg = MoEConfig(num_experts=2, grouping="batch")
    masked = route(logits, cfg, training=True, token_mask_T=mask)
    alone = route(logits[:2], cfg, training=True)
    assert math.isclose(float(load_balancing_loss(masked)), float(load_balancing_loss(alone)), rel_tol=1e-6)
    assert math.isclose(float(router_z_loss(masked)), float(router_z_loss(alone)), rel_tol=1e-6)
    assert not masked.keep[2:].any()


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4 -> mean of squares
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert math.isclose(float(router_z_loss(_routing(logits))), expected, rel_tol=1e-6)


def test_router_stats_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0]] * 3 + [[0.0, math.log(3.0)]])
    r = _routing(logits, capacity_factor=1.0, min_capacity=1)  # capacity round(1.0 * 4 / 2) = 2 slots per expert
    stats = router_stats(r)
    assert stats.tokens_per_expert.tolist() == [3.0, 1.0]
    assert math.isclose(float(stats.dropped_fraction), 0.25, rel_tol=1e-6)  # the third e0 token is dropped
    assert math.isclose(float(stats.router_confidence), 0.75, rel_tol=1e-6)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert math.isclose(float(stats.router_entropy), entropy, rel_tol=1e-5)

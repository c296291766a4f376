"""route() on four tokens, two experts and one slot each, worked by hand: the routing record as documentation."""

from __future__ import annotations

import math

import pytest
import torch

from switchformer.moe import MoEConfig, load_balancing_loss, route


def test_four_tokens_two_experts_capacity_one():
    """Tokens 0, 1 and 3 prefer expert 0, token 2 prefers expert 1. One group of 4 tokens, capacity
    max(1, round(0.5 * 4 / 2)) = 1: token 0 takes expert 0's only slot (first come, first served), token 2 takes
    expert 1's, and tokens 1 and 3 are dropped (their output is zero; the residual connection carries them)."""
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.5, 0.0]])
    config = MoEConfig(num_experts=2, capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1,
                       grouping="batch")  # fmt: skip
    routing = route(logits, config, training=False)

    assert routing.capacity == 1 and routing.num_groups == 1
    assert routing.choice.flatten().tolist() == [0, 0, 1, 0]
    assert routing.expert_index.flatten().tolist() == [0, 0, 1, 0]
    assert routing.keep.flatten().tolist() == [True, False, True, False]
    assert routing.position.flatten()[routing.keep.flatten()].tolist() == [0, 0]  # each kept token in slot 0
    # The gate is the chosen expert's probability p_i(x) = softmax(logits)_i: sigmoid of the logit gap for E = 2.
    gap = [2.0, 1.0, 3.0, 0.5]
    expected = [1 / (1 + math.exp(-g)) for g in gap]
    assert routing.gate.flatten().tolist() == pytest.approx(expected)
    # The balancing loss counts choices before capacity: f = (3/4, 1/4); P is the mean probability per expert.
    p0 = (expected[0] + expected[1] + (1 - expected[2]) + expected[3]) / 4
    assert float(load_balancing_loss(routing)) == pytest.approx(2 * (0.75 * p0 + 0.25 * (1 - p0)))

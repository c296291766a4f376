"""computed_once: computed on the first read only, kept on the instance, replaceable by assignment."""

from __future__ import annotations

import torch

from switchformer import SwitchFFN
from switchformer.computed_once import computed_once
from switchformer.moe.losses import load_balancing_loss, router_z_loss


class _Counter:
    def __init__(self) -> None:
        self.calls = 0

    @computed_once
    def value(self) -> int:
        self.calls += 1
        return 40 + self.calls


def test_computed_on_first_read_then_kept():
    counter = _Counter()
    assert counter.calls == 0
    assert counter.value == 41 and counter.value == 41
    assert counter.calls == 1
    counter.value = 7
    assert counter.value == 7 and counter.calls == 1


def test_a_switch_layer_computes_its_losses_when_read():
    torch.manual_seed(0)
    layer = SwitchFFN(d_model=8, d_ff=16, num_experts=4)
    out = layer(torch.randn(2, 5, 8))
    assert "load_balancing_loss" not in vars(out) and "z_loss" not in vars(out) and "stats" not in vars(out)
    assert torch.equal(out.load_balancing_loss, load_balancing_loss(out.routing))
    assert torch.equal(out.z_loss, router_z_loss(out.routing))
    assert out.load_balancing_loss is out.load_balancing_loss  # kept, not recomputed
    assert out.tokens_per_expert.sum() == 10

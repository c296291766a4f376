"""The sharded Adafactor is torch's Adafactor step for step; its norms over ranks are tested in test_expert_parallel."""

from __future__ import annotations

import pytest
import torch

from switchformer.parallel.adafactor import ShardedAdafactor
from switchformer.training.optim import optimizer_kind


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(6,), (5, 7), (4, 3, 8)]  # a vector (unfactored), a matrix, stacked experts [E, d, f]
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in shapes]


@pytest.mark.parametrize("settings", [{"lr": 1e-2}, {"lr": 0.5, "weight_decay": 0.1}, {"lr": 1e-2, "maximize": True}])
def test_it_steps_exactly_as_torch_adafactor_with_the_same_state(settings):
    ours, theirs = _params(0), _params(0)
    ours_opt = ShardedAdafactor(ours, sharded=[], group=None, **settings)
    theirs_opt = torch.optim.Adafactor(theirs, foreach=False, **settings)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(ours, theirs, strict=True):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        ours_opt.step()
        theirs_opt.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(ours, _params(0), strict=True))  # it did move them
    ours_state, theirs_state = ours_opt.state_dict()["state"], theirs_opt.state_dict()["state"]
    assert ours_state.keys() == theirs_state.keys()
    for index, entry in theirs_state.items():  # checkpoints move between the two
        assert ours_state[index].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(ours_state[index][key], value), (index, key)


def test_its_checkpoints_record_torch_adafactor_so_they_resume_in_one_process():
    ours = ShardedAdafactor(_params(0), sharded=[], group=None, lr=1e-2, foreach=True)  # foreach is overridden
    assert optimizer_kind(ours) == optimizer_kind(torch.optim.Adafactor(_params(0))) == "Adafactor"
    assert ours.param_groups[0]["foreach"] is False

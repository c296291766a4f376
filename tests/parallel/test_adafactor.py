"""The sharded Adafactor is torch's Adafactor step for step; its norms over ranks in a model are tested in
test_expert_parallel, their all-reduces here."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from switchformer.parallel.adafactor import ShardedAdafactor
from switchformer.training.optim import optimizer_kind
from tests.parallel.launcher import run_and_check

# a vector (unfactored), a matrix, stacked experts [E, d, f]
SHAPES: tuple[tuple[int, ...], ...] = ((6,), (5, 7), (4, 3, 8))
# E = 4: 2 per rank of 2. Three dimensions: Adafactor factors the last two, so a rank's slice has its own statistics.
EXPERT_SHAPES: tuple[tuple[int, ...], ...] = ((4, 3, 8), (4, 8, 3), (4, 2, 5))


def _params(seed: int, shapes: tuple[tuple[int, ...], ...] = SHAPES) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
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


def _sharded_steps(steps: int) -> dict[str, Any]:
    """One rank of 2: its halves of three expert weights (one param group) and two whole parameters (another)
    against torch's Adafactor over the whole ones, counting the all-reduces of each step."""
    dist.init_process_group("gloo")
    rows = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
    whole = _params(0, EXPERT_SHAPES) + _params(1, SHAPES[:2])
    experts = [torch.nn.Parameter(w.detach()[rows].clone()) for w in whole[:3]]
    ours = [*experts, *_params(1, SHAPES[:2])]
    settings = {"lr": 0.5, "weight_decay": 0.1}
    ours_opt = ShardedAdafactor([{"params": experts}, {"params": ours[3:]}], sharded=experts, group=None, **settings)
    theirs_opt = torch.optim.Adafactor(whole, foreach=False, **settings)

    def mine(i: int, tensor: torch.Tensor) -> torch.Tensor:  # this rank's part of whole parameter i
        return tensor[rows] if i < len(experts) else tensor

    g = torch.Generator().manual_seed(2)
    counts = []
    for _ in range(steps):
        for i, (a, b) in enumerate(zip(ours, whole, strict=True)):
            b.grad = torch.randn(b.shape, generator=g)
            a.grad = mine(i, b.grad).clone()
        with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce:
            ours_opt.step()
        counts.append(all_reduce.call_count)
        theirs_opt.step()
    diffs = [(a - mine(i, b)).abs().max().item() for i, (a, b) in enumerate(zip(ours, whole, strict=True))]
    return {"counts": counts, "max_diff": max(diffs)}


def test_a_sharded_step_makes_two_all_reduces_whatever_the_number_of_expert_weights():
    """One for the parameters' norms and one for the updates', not two per expert weight; none for the group of
    unsharded parameters. The steps still match one process's over the whole weights."""
    for result in run_and_check(_sharded_steps, 2, steps=3):
        assert result["counts"] == [2, 2, 2]
        assert result["max_diff"] <= 1e-5  # measured 2.4e-7

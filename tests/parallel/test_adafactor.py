"""The sharded Adafactor is torch's Adafactor step for step: bit for bit on plain tensors, and over DTensors split
between ranks (FSDP2 shards, expert slices) what one process computes over the whole weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from switchformer.parallel.adafactor import ShardedAdafactor
from switchformer.training.optim import optimizer_kind
from tests.parallel.launcher import run_and_check

# a vector (unfactored), a matrix, stacked experts [E, d, f]
SHAPES: tuple[tuple[int, ...], ...] = ((6,), (5, 7), (4, 3, 8))


def _params(seed: int, shapes: tuple[tuple[int, ...], ...] = SHAPES) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in shapes]


@pytest.mark.parametrize("settings", [{"lr": 1e-2}, {"lr": 0.5, "weight_decay": 0.1}, {"lr": 1e-2, "maximize": True}])
def test_it_steps_exactly_as_torch_adafactor_with_the_same_state(settings):
    ours, theirs = _params(0), _params(0)
    ours_opt = ShardedAdafactor(ours, **settings)
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
    ours = ShardedAdafactor(_params(0), lr=1e-2, foreach=True)  # foreach is overridden
    assert optimizer_kind(ours) == optimizer_kind(torch.optim.Adafactor(_params(0))) == "Adafactor"
    assert ours.param_groups[0]["foreach"] is False


# What FSDP2 and expert parallelism make of weights: rows split over the ranks (evenly or not; the factored
# row dimension of a matrix, the expert dimension of a stack, a vector's only dimension), or kept whole.
SHARDED: tuple[tuple[tuple[int, ...], Any], ...] = (
    ((6,), Shard(0)),
    ((5, 7), Shard(0)),  # 3 rows and 2: Adafactor's column means average over both ranks' rows
    ((8, 6), Shard(1)),  # columns split: the row means are the sums over ranks
    ((4, 3, 8), Shard(0)),  # 2 experts per rank
    ((4, 3), Replicate()),
)


def _sharded_steps(steps: int) -> dict[str, Any]:
    """One rank of 2: DTensor parameters (two parameter groups) against torch's Adafactor over the whole ones."""
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)
    whole = [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape, _ in SHARDED]
    ours = [
        torch.nn.Parameter(distribute_tensor(w.detach().clone(), mesh, [p]))
        for w, (_, p) in zip(whole, SHARDED, strict=True)
    ]
    settings = {"lr": 0.5, "weight_decay": 0.1}
    ours_opt = ShardedAdafactor([{"params": ours[:3]}, {"params": ours[3:]}], **settings)
    theirs_opt = torch.optim.Adafactor(whole, foreach=False, **settings)
    for _ in range(steps):
        for a, b in zip(ours, whole, strict=True):
            b.grad = torch.randn(b.shape, generator=g)
            a.grad = distribute_tensor(b.grad.clone(), mesh, a.placements)
        ours_opt.step()
        theirs_opt.step()
    diffs = [(a.full_tensor() - b).abs().max().item() for a, b in zip(ours, whole, strict=True)]
    moved = min((a.full_tensor() - w).abs().max().item() for a, w in zip(ours, _initial(), strict=True))
    state = ours_opt.state_dict()["state"][1]
    return {"max_diff": max(diffs), "moved": moved, "row_var": tuple(state["row_var"].shape)}


def _initial() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g) for shape, _ in SHARDED]


def test_sharded_steps_match_one_process_over_the_whole_weights():
    """Norms, row and column means are taken over whole weights, not a rank's slice (taken over each rank's slice
    instead, the weights differ from one process's by 1.3 after three steps)."""
    for result in run_and_check(_sharded_steps, 2, steps=3):
        assert result["max_diff"] <= 1e-5, result  # measured 4.8e-7
        assert result["moved"] > 1e-3  # every weight moved
        assert result["row_var"] == (5, 1)  # torch's state layout: a checkpoint resumes with either optimizer

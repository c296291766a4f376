"""Layouts: which splits of the world are accepted, what the errors say, and where each rank sits in the mesh.

Placement is planned in this process on torch's fake process group (no communication; the ``fake_rank`` fixture of
conftest.py): one rank at a time joins a fake world, builds its layout and splits a Switch layer, so every rank of an
8-rank layout is checked in milliseconds.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.distributed as dist

from switchformer import ConfigError, SwitchFFN
from switchformer.cli.common import parallel_dims, torchrun_job
from switchformer.parallel import ParallelDims, apply_expert_parallel, expert_shards, init_parallel


def _layer(num_experts: int = 4) -> SwitchFFN:
    torch.manual_seed(0)
    return SwitchFFN(d_model=8, d_ff=16, num_experts=num_experts)


# -- which layouts fit a world ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dims", "world", "resolved"),
    [
        (ParallelDims(), 4, (1, 4, 1)),  # the default: FSDP over every rank
        (ParallelDims(expert_parallel=2), 8, (1, 4, 2)),
        (ParallelDims(dp_replicate=2, dp_shard=2), 4, (2, 2, 1)),
        (ParallelDims(dp_replicate=-1, dp_shard=2, expert_parallel=2), 8, (2, 2, 2)),
        (ParallelDims(dp_shard=1, expert_parallel=-1), 4, (1, 1, 4)),
        (ParallelDims(dp_replicate=2, dp_shard=1, expert_parallel=1), 2, (2, 1, 1)),
    ],
)
def test_resolve_fills_the_one_degree_given_as_minus_one(dims, world, resolved):
    out = dims.resolve(world)
    assert (out.dp_replicate, out.dp_shard, out.expert_parallel) == resolved
    assert out.world_size == world


@pytest.mark.parametrize(
    ("dims", "world", "message"),
    [
        (ParallelDims(expert_parallel=3), 4, r"\(dp_replicate 1, expert_parallel 3\) does not divide the world size 4"),
        (ParallelDims(dp_replicate=2, dp_shard=2, expert_parallel=2), 4, r"does not divide the world size 4"),
        (ParallelDims(dp_replicate=2, dp_shard=2, expert_parallel=2), 16, r"has 8 ranks but the world has 16"),
        (ParallelDims(dp_shard=2, expert_parallel=1), 4, r"has 2 ranks but the world has 4.*pass -1"),
    ],
)
def test_resolve_refuses_layouts_that_do_not_multiply_to_the_world_size(dims, world, message):
    with pytest.raises(ConfigError, match=message):
        dims.resolve(world)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dp_shard": -1, "expert_parallel": -1}, r"only one of \['dp_shard', 'expert_parallel'\] may be -1"),
        ({"dp_replicate": 0}, r"dp_replicate.*must be >= 1, or -1"),
        ({"expert_parallel": -2}, r"expert_parallel"),
    ],
)
def test_invalid_degrees_are_refused_when_the_dims_are_made(fields, message):
    with pytest.raises(ConfigError, match=message):
        ParallelDims(**fields)


def test_check_experts_names_the_allowed_expert_parallel_degrees():
    ParallelDims(expert_parallel=4).check_experts(8)
    with pytest.raises(ConfigError, match=r"expert_parallel=3 is invalid.*num_experts=8.*allowed: \[1, 2, 4, 8\]"):
        ParallelDims(expert_parallel=3).check_experts(8)


def test_cli_flags_give_the_layout():
    def dims(**flags):
        return parallel_dims(argparse.Namespace(**{"dp_shard": None, "dp_replicate": 1, "expert_parallel": 1, **flags}))

    assert dims() == ParallelDims(dp_replicate=1, dp_shard=-1, expert_parallel=1)
    assert dims(expert_parallel=2) == ParallelDims(dp_shard=-1, expert_parallel=2)
    assert dims(expert_parallel=-1) == ParallelDims(dp_shard=1, expert_parallel=-1)  # -1 given: shard stays 1
    assert dims(dp_shard=2, dp_replicate=2) == ParallelDims(dp_replicate=2, dp_shard=2)


def test_a_multi_rank_layout_outside_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with (
        pytest.raises(ValueError, match=r"torchrun --nproc-per-node 4 -m switchformer train"),
        torchrun_job("train", ParallelDims(dp_shard=2, expert_parallel=2)),
    ):
        pass
    with torchrun_job("train", ParallelDims()) as strategy:  # the default layout fits one process: no job to join
        assert strategy is None


def test_init_parallel_outside_torchrun_says_how_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    hint = r"MASTER_ADDR.*`torchrun --nproc-per-node 2 -m switchformer finetune \.\.\.`"
    with pytest.raises(RuntimeError, match=hint):
        init_parallel(ParallelDims(expert_parallel=2), command="finetune")


def test_init_parallel_refuses_a_layout_before_connecting(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    for name, value in (("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):  # nobody listens on 1
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="does not divide the world size 4"):
        init_parallel(ParallelDims(expert_parallel=3))
    assert not dist.is_initialized()


# -- where each rank sits --------------------------------------------------------------------------------------
def test_the_mesh_puts_expert_parallel_ranks_next_to_each_other(fake_rank):
    """(dp_replicate, dp_shard, ep) = (2, 2, 2), row-major: ranks 2k and 2k+1 exchange tokens; ranks 0-3 hold one
    model between them (dense weights sharded over dp_shard x ep) and ranks 4-7 its replica."""
    for rank in range(8):
        layout = fake_rank(rank, 8, ParallelDims(dp_replicate=2, dp_shard=2, expert_parallel=2))
        assert (layout.ep_rank, layout.replica, layout.ep_size, layout.world_size) == (rank % 2, rank // 4, 2, 8)
        assert dist.get_process_group_ranks(layout.ep_group) == [rank - rank % 2, rank - rank % 2 + 1]
        assert dist.get_process_group_ranks(layout.shard_group) == list(range(4 * (rank // 4), 4 * (rank // 4) + 4))
        assert layout.dense_mesh.shape == (2, 4) and layout.expert_mesh.shape == (2, 2)


def test_each_rank_keeps_its_contiguous_slice_of_the_experts(fake_rank):
    full = _layer(4)
    for rank in range(4):
        layout = fake_rank(rank, 4, ParallelDims(dp_shard=2, expert_parallel=2))
        layer = apply_expert_parallel(_layer(4), layout)
        start = 2 * layout.ep_rank
        assert set(expert_shards(layer)) == {"experts.wi", "experts.wo"}
        assert layer.experts.num_experts == 2
        assert layer.experts.wi.shape == full.experts.wi.shape  # a DTensor of the whole layer's global shape
        assert torch.equal(layer.experts.wi.to_local(), full.experts.wi[start : start + 2])
        assert torch.equal(layer.experts.wo.to_local(), full.experts.wo[start : start + 2])
        assert torch.equal(layer.router.weight, full.router.weight)  # the router stays whole
        assert [n for n, _ in layer.named_parameters()] == [n for n, _ in full.named_parameters()]


def test_experts_must_divide_evenly_over_the_expert_parallel_ranks(fake_rank):
    layout = fake_rank(0, 8, ParallelDims(dp_shard=1, expert_parallel=8))
    with pytest.raises(ConfigError, match=r"Switch layer '<root>': expert_parallel=8 is invalid.*num_experts=4"):
        apply_expert_parallel(_layer(4), layout)


def test_applying_twice_is_an_error(fake_rank):
    layout = fake_rank(0, 2, ParallelDims(dp_shard=1, expert_parallel=2))
    layer = apply_expert_parallel(_layer(4), layout)
    with pytest.raises(ValueError, match="already expert-parallel"):
        apply_expert_parallel(layer, layout)


def test_one_expert_parallel_rank_leaves_the_layer_alone(fake_rank):
    layout = fake_rank(1, 2, ParallelDims(dp_shard=2))
    layer = _layer(4)
    dispatcher = layer.dispatcher
    apply_expert_parallel(layer, layout)
    assert layer.dispatcher is dispatcher and not expert_shards(layer)

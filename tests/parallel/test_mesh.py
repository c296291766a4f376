"""Layout checks and expert sharding that need no process group."""

from __future__ import annotations

import datetime

import pytest
import torch

from switchformer import ConfigError, SwitchFFN
from switchformer.parallel import (
    ParallelLayout,
    ShardMismatchError,
    apply_expert_parallel,
    check_layout,
    expert_shards,
    init_parallel,
    load_full_state_dict,
    slice_global_batch,
)


def _layout(ep_rank: int, ep_size: int, dp_size: int = 1) -> ParallelLayout:
    """A layout whose groups are never used (nothing here runs a collective)."""
    return ParallelLayout(
        rank=ep_rank,
        world_size=ep_size * dp_size,
        local_rank=ep_rank,
        ep_rank=ep_rank,
        ep_size=ep_size,
        dp_rank=0,
        dp_size=dp_size,
        device=torch.device("cpu"),
        ep_group=None,
        expert_dp_group=None,
        dense_group=None,
        timeout=datetime.timedelta(seconds=1),
    )


def _layer(num_experts: int = 4) -> SwitchFFN:
    torch.manual_seed(0)
    return SwitchFFN(d_model=8, d_ff=16, num_experts=num_experts)


def test_check_layout_gives_the_data_parallel_degree():
    assert check_layout(8, 2) == 4
    assert check_layout(4, 4) == 1


@pytest.mark.parametrize(("world", "ep"), [(4, 3), (6, 4), (2, 0)])
def test_check_layout_rejects_an_expert_parallel_degree_that_does_not_divide_the_world(world, ep):
    with pytest.raises(ConfigError, match=rf"expert_parallel={ep} is invalid"):
        check_layout(world, ep)


def test_init_parallel_outside_torchrun_says_how_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match=r"torchrun --nproc-per-node 2 -m switchformer train --expert-parallel 2"):
        init_parallel(2)
    hint = r"MASTER_ADDR.*`torchrun --nproc-per-node 2 -m switchformer finetune \.\.\.`"  # no EP flag at ep=1
    with pytest.raises(RuntimeError, match=hint):
        init_parallel(1, command="finetune")


def test_experts_must_divide_evenly_over_the_expert_parallel_ranks():
    with pytest.raises(ConfigError, match=r"num_experts=4 must be divisible"):
        apply_expert_parallel(_layer(4), _layout(0, 3))


def test_each_rank_keeps_its_contiguous_slice_of_the_experts():
    full = _layer(4)
    for ep_rank in range(2):
        layer = apply_expert_parallel(_layer(4), _layout(ep_rank, 2))
        assert set(expert_shards(layer)) == {"experts.wi", "experts.wo"}
        assert layer.experts.num_experts == 2
        assert torch.equal(layer.experts.wi, full.experts.wi[2 * ep_rank : 2 * ep_rank + 2])
        assert torch.equal(layer.experts.wo, full.experts.wo[2 * ep_rank : 2 * ep_rank + 2])
        assert torch.equal(layer.router.weight, full.router.weight)  # the router stays replicated
        assert [n for n, _ in layer.named_parameters()] == [n for n, _ in full.named_parameters()]


def test_applying_twice_is_an_error():
    layer = apply_expert_parallel(_layer(4), _layout(0, 2))
    with pytest.raises(ValueError, match="already expert-parallel"):
        apply_expert_parallel(layer, _layout(0, 2))


def test_one_expert_parallel_rank_leaves_the_model_alone():
    layer = _layer(4)
    dispatcher = layer.dispatcher
    apply_expert_parallel(layer, _layout(0, 1, dp_size=2))
    assert layer.dispatcher is dispatcher and not expert_shards(layer)


def test_load_full_state_dict_takes_this_ranks_slice():
    full = _layer(4)
    torch.manual_seed(1)
    layer = apply_expert_parallel(SwitchFFN(d_model=8, d_ff=16, num_experts=4), _layout(1, 2))
    load_full_state_dict(layer, full.state_dict(), _layout(1, 2))
    assert torch.equal(layer.experts.wi, full.experts.wi[2:])
    assert torch.equal(layer.router.weight, full.router.weight)


def test_load_full_state_dict_names_a_mismatched_expert_count():
    layer = apply_expert_parallel(_layer(4), _layout(0, 2))
    with pytest.raises(ShardMismatchError, match=r"experts\.wi has shape \(8, 8, 16\); expected 4 experts"):
        load_full_state_dict(layer, _layer(8).state_dict(), _layout(0, 2))
    with pytest.raises(ShardMismatchError, match="this rank's layout is 1/2"):
        load_full_state_dict(layer, _layer(4).state_dict(), _layout(1, 2))


def test_slice_global_batch_gives_each_rank_its_contiguous_share():
    batch = {"input_ids": torch.arange(8)[:, None].expand(8, 3), "labels": torch.arange(8)[:, None]}
    local = slice_global_batch(batch, _layout(1, 2, dp_size=2))  # rank 1 of 4
    assert local["input_ids"][:, 0].tolist() == [2, 3]
    assert local["labels"][:, 0].tolist() == [2, 3]
    with pytest.raises(ValueError, match="must split into 4 equal slices"):
        slice_global_batch({"input_ids": torch.zeros(6, 3)}, _layout(1, 2, dp_size=2))

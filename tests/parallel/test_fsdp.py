"""The whole model under FSDP2 and expert parallelism, in every layout, against one process: the tiny
encoder-decoder of ``workers.tiny_model_config`` built as the trainer builds it (meta device, split, sharded,
materialised), trained a few steps with AdamW or Adafactor and global-norm clipping."""

from __future__ import annotations

import pytest

from switchformer import build_model
from switchformer.parallel import ParallelDims
from tests.parallel import workers
from tests.parallel.launcher import run_and_check

EP2 = {"expert_parallel": 2, "dp_shard": 1}


def _train(tmp_path, world: int, dims: dict[str, int], **kwargs) -> list[dict]:
    results = run_and_check(
        workers.check_model_training, world, timeout_s=240, dims=dims, checkpoint_dir=str(tmp_path), **kwargs
    )
    assert all(r["losses"] == results[0]["losses"] for r in results)  # every rank reports the same global losses
    _assert_each_rank_holds_its_share(results, ParallelDims(**dims).resolve(world))
    return results


def _assert_each_rank_holds_its_share(results: list[dict], dims: ParallelDims) -> None:
    """The parameter bytes a rank holds shrink as 1/N, N = dp_shard * ep (the ranks of one replica): dense weights
    are sharded over all N, each expert slice of 1/ep over dp_shard. FSDP2 pads a weight's rows to a multiple of
    its shard count, which this config's shapes never need, so the shares are exact."""
    one_process = {"expert": 0, "dense": 0}
    for name, param in build_model(workers.tiny_model_config(), seed=0).named_parameters():
        one_process["expert" if ".experts." in name else "dense"] += param.numel() * param.element_size()
    shards = dims.dp_shard * dims.expert_parallel
    for result in results:
        assert result["held"] == {kind: size // shards for kind, size in one_process.items()}, (result["held"], shards)


def test_expert_parallel_training_matches_one_process_on_2_ranks(tmp_path):
    _train(tmp_path, 2, EP2)


def test_fsdp_training_matches_one_process_on_2_ranks(tmp_path):
    """Every weight, experts included, sharded over dp_shard: no all-to-all at all."""
    _train(tmp_path, 2, {"dp_shard": 2})


def test_adafactor_and_activation_checkpointing_under_expert_parallelism_match_one_process(tmp_path):
    """Adafactor's relative step size and update clipping take norms over whole expert weights, not a rank's slice;
    each rank recomputes its blocks in backward, all-to-alls included, in the same order on every rank."""
    _train(tmp_path, 2, EP2, optimizer_kind="adafactor", activation_checkpointing=1)


@pytest.mark.slow
def test_expert_parallel_4_ranks(tmp_path):
    _train(tmp_path, 4, {"expert_parallel": 4, "dp_shard": 1}, steps=2)


def test_expert_parallel_2_by_fsdp_2(tmp_path):
    _train(tmp_path, 4, {"expert_parallel": 2, "dp_shard": 2}, steps=2)


@pytest.mark.slow
def test_hsdp_2_replicas_of_2_shards(tmp_path):
    _train(tmp_path, 4, {"dp_replicate": 2, "dp_shard": 2}, steps=2)


@pytest.mark.slow
def test_adafactor_2_by_fsdp_2_with_activation_checkpointing(tmp_path):
    _train(
        tmp_path,
        4,
        {"expert_parallel": 2, "dp_shard": 2},
        steps=2,
        optimizer_kind="adafactor",
        activation_checkpointing=1,
    )


@pytest.mark.slow
def test_2_replicas_of_expert_parallel_2(tmp_path):
    _train(tmp_path, 4, {"dp_replicate": 2, "dp_shard": 1, "expert_parallel": 2}, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "dims",
    [{"dp_replicate": 2, "dp_shard": 2, "expert_parallel": 2}, {"expert_parallel": 8, "dp_shard": 1}],
    ids=["2x2x2", "ep8"],
)
def test_8_ranks(tmp_path, dims):
    _train(tmp_path, 8, dims, steps=2, rows=16)

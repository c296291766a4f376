"""The whole model under FSDP2 and expert parallelism, in every layout, against one process: the tiny
encoder-decoder of ``workers.tiny_model_config`` built as the trainer builds it (meta device, split, sharded,
materialised), trained a few steps with AdamW or Adafactor and global-norm clipping."""

from __future__ import annotations

import pytest

from tests.parallel import workers
from tests.parallel.launcher import run_and_check

EP2 = {"expert_parallel": 2, "dp_shard": 1}


def _train(tmp_path, world: int, dims: dict[str, int], **kwargs) -> list[dict]:
    results = run_and_check(
        workers.check_model_training, world, timeout_s=240, dims=dims, checkpoint_dir=str(tmp_path), **kwargs
    )
    assert all(r == results[0] for r in results)  # every rank reports the same global losses
    return results


def test_expert_parallel_training_matches_one_process_on_2_ranks(tmp_path):
    _train(tmp_path, 2, EP2)


def test_fsdp_training_matches_one_process_on_2_ranks(tmp_path):
    """Every weight, experts included, sharded over dp_shard: no all-to-all at all."""
    _train(tmp_path, 2, {"dp_shard": 2})


def test_activation_checkpointing_under_expert_parallelism_matches_one_process(tmp_path):
    """Each rank recomputes its blocks in backward, all-to-alls included, in the same order on every rank."""
    _train(tmp_path, 2, EP2, activation_checkpointing=1)


def test_adafactor_under_expert_parallelism_matches_one_process(tmp_path):
    """Its relative step size and update clipping take norms over whole expert weights, not a rank's slice."""
    _train(tmp_path, 2, EP2, optimizer_kind="adafactor")


def test_expert_parallel_4_ranks(tmp_path):
    _train(tmp_path, 4, {"expert_parallel": 4, "dp_shard": 1}, steps=2)


def test_expert_parallel_2_by_fsdp_2(tmp_path):
    _train(tmp_path, 4, {"expert_parallel": 2, "dp_shard": 2}, steps=2)


def test_hsdp_2_replicas_of_2_shards(tmp_path):
    _train(tmp_path, 4, {"dp_replicate": 2, "dp_shard": 2}, steps=2)


@pytest.mark.slow
def test_adafactor_2_by_fsdp_2_with_activation_checkpointing(tmp_path):
    _train(tmp_path, 4, {"expert_parallel": 2, "dp_shard": 2}, steps=2, optimizer_kind="adafactor",
           activation_checkpointing=1)  # fmt: skip


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

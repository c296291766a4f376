"""Slicing the global batch: each rank its contiguous share, the same in every layout of the same world size."""

from __future__ import annotations

import pytest
import torch

from switchformer.parallel import ParallelDims, slice_global_batch


def _batch(rows: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.arange(rows)[:, None].expand(rows, 3), "labels": torch.arange(rows)[:, None]}


@pytest.mark.parametrize(
    "dims",
    [
        ParallelDims(dp_shard=4),
        ParallelDims(dp_shard=2, expert_parallel=2),
        ParallelDims(dp_replicate=2, dp_shard=2),
        ParallelDims(dp_shard=1, expert_parallel=4),
    ],
    ids=["fsdp4", "fsdp2-ep2", "hsdp2x2", "ep4"],
)
def test_each_rank_gets_its_contiguous_share_whatever_the_layout(fake_rank, dims):
    """The ranks' slices, concatenated in rank order, are the global batch: routing groups that stay inside a
    slice are the groups one process forms."""
    slices = []
    for rank in range(4):
        local = slice_global_batch(_batch(8), fake_rank(rank, 4, dims))
        assert local["input_ids"][:, 0].tolist() == local["labels"][:, 0].tolist() == [2 * rank, 2 * rank + 1]
        slices.append(local["input_ids"])
    assert torch.equal(torch.cat(slices), _batch(8)["input_ids"])


def test_a_batch_that_does_not_split_evenly_is_refused(fake_rank):
    layout = fake_rank(1, 4, ParallelDims(dp_shard=2, expert_parallel=2))
    with pytest.raises(ValueError, match=r"must split into 4 equal slices.*divisible by the world size"):
        slice_global_batch({"input_ids": torch.zeros(6, 3)}, layout)
    with pytest.raises(ValueError, match=r"rows per field: \{'input_ids': 8, 'labels': 4\}"):
        slice_global_batch({"input_ids": torch.zeros(8, 3), "labels": torch.zeros(4, 3)}, layout)

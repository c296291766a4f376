"""Fixtures of the layout tests."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from switchformer.parallel import ParallelDims, ParallelLayout, build_layout


@pytest.fixture
def fake_rank():
    """``join(rank, world, dims)``: join a fake world (torch's fake process group: no communication) as ``rank``
    and build its layout, leaving the previous one; the last is left after the test."""

    def join(rank: int, world: int, dims: ParallelDims) -> ParallelLayout:
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        return build_layout(dims)

    yield join
    if dist.is_initialized():
        dist.destroy_process_group()

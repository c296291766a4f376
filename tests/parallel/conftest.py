"""Fixtures of the layout tests."""

from __future__ import annotations

from pathlib import Path

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


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory: pytest.TempPathFactory):
    """``get(*extra, jitter=False, steps=runs.STEPS)``: the run folder of ``switchformer train`` in one process with
    ``runs.train_args(*extra, ...)``, the uninterrupted run the parallel ones must reproduce (made once)."""
    from switchformer.cli.main import main
    from tests.parallel.runs import STEPS, train_args

    made: dict[tuple, Path] = {}

    def get(*extra: str, jitter: bool = False, steps: int = STEPS) -> Path:
        key = (extra, jitter, steps)
        if key not in made:
            run = tmp_path_factory.mktemp("one-process") / "run"
            assert main(["train", *train_args(*extra, jitter=jitter, steps=steps), "--output", str(run)]) == 0
            made[key] = run
        return made[key]

    return get

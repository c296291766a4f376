"""Sharded (DCP) checkpoints written over several ranks: an asynchronous save writes exactly what a synchronous save
of the same step writes, although training goes on and updates the weights in place while it is being written."""

from __future__ import annotations

import pytest
import torch

from switchformer.training.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint
from switchformer.training.metrics import read_metrics
from tests.parallel import runs
from tests.parallel.launcher import run_and_check
from tests.parallel.train_workers import train_cli_holding_async_writes

ARGS = runs.train_args("--expert-parallel", "2", "--checkpoint-every", "2", "--optimizer", "adafactor", steps=4)


def _assert_equal(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_an_asynchronous_checkpoint_equals_a_synchronous_one_of_the_same_step(tmp_path):
    sync, held = tmp_path / "sync", tmp_path / "async"
    runs.train_on_ranks(2, ARGS, sync)
    results = run_and_check(
        train_cli_holding_async_writes,
        2,
        timeout_s=runs.LAUNCH_TIMEOUT_S,
        args=[*ARGS, "--async-checkpoint"],
        run_dir=str(held),
    )
    # Step 2's write waited for step 3's update; step 4's, the last, for the end of the run.
    assert [r["released"] for r in results] == [["step 3", "wait"]] * 2
    assert [r["loss"] for r in read_metrics(held)] == [r["loss"] for r in read_metrics(sync)]  # the same training
    ours, theirs = list_checkpoints(held / "checkpoints"), list_checkpoints(sync / "checkpoints")
    assert [p.name for p in ours] == [p.name for p in theirs] == ["step-00000002", "step-00000004"]
    for a, b in zip(ours, theirs, strict=True):
        assert verify_checkpoint(a)["format"] == "dcp"
        x, y = load_checkpoint(a), load_checkpoint(b)
        _assert_equal(x.model_state, y.model_state, f"{a.name} model")
        _assert_equal(x.optimizer_state, y.optimizer_state, f"{a.name} optimizer")
        mine = {k: v for k, v in x.trainer_state.items() if k != "elapsed_seconds"}
        _assert_equal(mine, {k: v for k, v in y.trainer_state.items() if k != "elapsed_seconds"}, f"{a.name} state")

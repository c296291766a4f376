"""`switchformer train --expert-parallel 2` on two gloo ranks logs what one process logs on the same global batch."""

from __future__ import annotations

import pytest

from switchformer.cli.main import main
from switchformer.training.checkpoint import latest_checkpoint, load_checkpoint
from switchformer.training.metrics import read_metrics
from tests.parallel.launcher import run_and_check
from tests.parallel.train_workers import train_cli

# No jitter: each rank draws its own noise stream, so with jitter the runs agree only statistically.
ARGS = ["--steps", "4", "--seq-len", "64", "--batch-size", "4", "--vocab-size", "600", "--log-every", "1",
        "--eval-every", "2", "--checkpoint-every", "2", "--no-progress", "--data-set", "max_corpus_bytes=300000",
        "--set", "moe.router_jitter=0", "--set", "moe.grouping=sequence", "--train-set", "threads=1"]  # fmt: skip


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_expert_parallel_training_matches_one_process(tmp_path, optimizer):
    args = [*ARGS, "--optimizer", optimizer]
    single = tmp_path / "single"
    assert main(["train", *args, "--output", str(single)]) == 0
    expected = read_metrics(single)

    parallel = tmp_path / "parallel"
    results = run_and_check(train_cli, 2, timeout_s=300, args=[*args, "--expert-parallel", "2"], run_dir=str(parallel))
    logged = results[0]
    assert [r["step"] for r in logged] == [r["step"] for r in expected] == [1, 2, 3, 4]
    for a, b in zip(logged, expected, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-5), a["step"]
        assert a["lr"] == b["lr"]
        if "val_loss" in b:
            assert a["val_loss"] == pytest.approx(b["val_loss"], abs=2e-5)
    # the expert-parallel checkpoint holds the full model: one process loads it and finds the same weights
    ours = load_checkpoint(latest_checkpoint(parallel / "checkpoints")).model_state
    theirs = load_checkpoint(latest_checkpoint(single / "checkpoints")).model_state
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].shape == theirs[name].shape
        # measured: 1.2e-7 (AdamW), 2.4e-7 (Adafactor); 1.9e-6 for Adafactor with per-slice norms
        assert (ours[name] - theirs[name]).abs().max() < 1e-6, name


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_resume_an_expert_parallel_run_in_one_process(tmp_path, optimizer):
    """Adafactor: the expert-parallel run's ShardedAdafactor keeps torch's Adafactor state (found in review)."""
    run = tmp_path / "run"
    args = [*ARGS, "--optimizer", optimizer, "--expert-parallel", "2", "--steps", "2"]
    run_and_check(train_cli, 2, timeout_s=300, args=args, run_dir=str(run))
    assert main(["train", "--resume", "--output", str(run), "--steps", "4", "--no-progress"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_expert_parallel_without_torchrun_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--expert-parallel", "2", "--output", str(tmp_path / "r")]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err

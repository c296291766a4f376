"""`switchformer finetune` under torchrun: sharded, replicated or expert-parallel, with what one process computes, and
one writer."""

from __future__ import annotations

import types

import pytest
import torch

from switchformer.cli.main import main
from switchformer.finetune import finetune
from switchformer.training.config import TrainConfig
from tests.finetune.helpers import task_config, tiny_config, write_checkpoint, write_task
from tests.parallel.launcher import run_and_check
from tests.parallel.tolerances import adamw_drift_bound
from tests.parallel.train_workers import finetune_cli

# No dropout (each rank draws its own masks); each sequence its own routing group (a group must not straddle the
# ranks' slices for their capacity to match one process's); early stopping that must fire at step 6 of 9: val_loss
# never improves by 10, so the evaluation at step 6 is the first without improvement and patience 1 ends the run.
PEAK_LR = 5e-3
ARGS = ["--steps", "9", "--eval-every", "3", "--batch-size", "8", "--lr", str(PEAK_LR), "--dropout", "0",
        "--expert-dropout", "0", "--metric", "val_loss", "--patience", "1", "--finetune-set", "min_delta=10",
        "--finetune-set", "max_new_tokens=6", "--finetune-set", "eval_batch_size=4", "--set", "moe.grouping=sequence",
        "--train-set", "threads=1", "--no-progress"]  # fmt: skip


BETAS = TrainConfig().betas  # finetune keeps the default AdamW betas


@pytest.mark.parametrize(
    "parallel",
    [[], ["--dp-replicate", "2"], ["--expert-parallel", "2"]],
    ids=["fsdp", "replicas", "expert-parallel"],
)
def test_finetuning_on_2_ranks_matches_one_process_and_stops_on_every_rank(tmp_path, parallel):
    """The default layout shards the model over both ranks (FSDP2): one replica, so both ranks decode all 9
    validation examples in lockstep, as do the two ranks of an expert-parallel group (each holds 2 of the 4 experts;
    split, rank 0's second batch would wait forever for rank 1's all-to-alls). Two replicas (--dp-replicate 2) hold
    the whole model each and decode 5 and 4 of the examples, in 2 and 1 batches. The best model is saved whole,
    gathered from the shards."""
    checkpoint = write_checkpoint(tmp_path / "start", tiny_config())
    train, validation = write_task(tmp_path / "task", train=64, validation=9)
    args = [str(checkpoint), "--train", str(train), "--validation", str(validation), *ARGS]
    single = finetune_cli(args, str(tmp_path / "single"))
    ranks = run_and_check(finetune_cli, 2, timeout_s=300, args=[*args, *parallel], output=str(tmp_path / "parallel"))

    assert single["rows"] == {8} and [r["rows"] for r in ranks] == [{4}, {4}]  # each rank trains on its half
    assert [e["step"] for e in single["evals"]] == [0, 3, 6]  # stopped early after step 6, not at 9
    # Three evaluations of the 9 examples: all of them on every rank of the one replica, or 5 and 4 per replica.
    assert single["decoded"] == 27
    assert [r["decoded"] for r in ranks] == ([15, 12] if "--dp-replicate" in parallel else [27, 27])
    for rank in ranks:  # every rank stopped after the same step and reads the main rank's files
        assert rank["evals"] == ranks[0]["evals"] and rank["best"] == ranks[0]["best"]
    for got, expected in zip(ranks[0]["evals"], single["evals"], strict=True):
        assert got["step"] == expected["step"]
        assert got["val_loss"] == pytest.approx(expected["val_loss"], abs=2e-5), got["step"]
        assert got["exact_match"] == expected["exact_match"], got["step"]  # two shares summed (see tests/finetune)
    assert [r["step"] for r in ranks[0]["metrics"]] == [r["step"] for r in single["metrics"]]
    for got, expected in zip(ranks[0]["metrics"], single["metrics"], strict=True):
        assert got["loss"] == pytest.approx(expected["loss"], abs=2e-5), got["step"]
    assert ranks[0]["best"]["step"] == single["best"]["step"] == 3
    assert ranks[0]["best"]["val_loss"] == pytest.approx(single["best"]["val_loss"], abs=2e-5)
    # Every expert in its place, from both ranks, up to the drift AdamW's arithmetic allows (tests/parallel/tolerances):
    # an expert in another's place would differ by about its weights' size.
    assert ranks[0]["best_weights"].keys() == single["best_weights"].keys()
    lrs = [PEAK_LR] * single["best"]["step"]  # no step's rate exceeds the peak, and the bound grows with it
    for name, expected in single["best_weights"].items():
        got = ranks[0]["best_weights"][name]
        assert got.shape == expected.shape, name
        bound = adamw_drift_bound(lrs, BETAS, weight_scale=expected.abs().max().item())
        assert (got - expected).abs().max() <= bound, (name, bound)


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_before_training(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "start", tiny_config())
    train, validation = write_task(tmp_path / "task", train=8, validation=4)
    two_ranks = types.SimpleNamespace(world_size=2, rank=0, is_main=True)
    with pytest.raises(ValueError, match=r"batch_size=7 must divide by the world size 2"):
        finetune(checkpoint, train=train, validation=validation, run_dir=tmp_path / "run",
                 config=task_config(batch_size=7), strategy=two_ranks)  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_torchrun_finetune_needs_an_output_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = ["finetune", str(tmp_path / "start"), "--train", "t.jsonl", "--validation", "v.jsonl"]
    assert main(argv) == 2
    assert "a torchrun launch needs --output" in capsys.readouterr().err


def test_bf16_finetuning_on_2_ranks_keeps_bf16_shards_and_float32_routers(tmp_path):
    """``--dtype bf16``: each rank streams its shards of the checkpoint into bf16 (routers float32), trains them,
    and the best model is saved in those precisions; the losses follow one process's bf16 run (bf16 rounding of
    differently reduced gradients apart)."""
    checkpoint = write_checkpoint(tmp_path / "start", tiny_config())
    train, validation = write_task(tmp_path / "task", train=64, validation=9)
    args = [str(checkpoint), "--train", str(train), "--validation", str(validation), *ARGS, "--dtype", "bf16"]
    single = finetune_cli(args, str(tmp_path / "single"))
    ranks = run_and_check(finetune_cli, 2, timeout_s=300, args=args, output=str(tmp_path / "parallel"))
    for weights in (single["best_weights"], ranks[0]["best_weights"]):
        dtypes = {name: tensor.dtype for name, tensor in weights.items()}
        assert {dtypes[n] for n in dtypes if ".router." in n} == {torch.float32}
        assert {dtypes[n] for n in dtypes if ".router." not in n} == {torch.bfloat16}
    for got, expected in zip(ranks[0]["metrics"], single["metrics"], strict=True):
        assert got["loss"] == pytest.approx(expected["loss"], abs=0.05), got["step"]

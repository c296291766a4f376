"""The main job end to end through the CLI, on a small slice of the built-in corpus."""

from __future__ import annotations

import json

import pytest

from switchformer.cli.main import main
from switchformer.training.metrics import read_metrics

SMALL = ["--seq-len", "64", "--batch-size", "4", "--vocab-size", "600", "--data-set", "max_corpus_bytes=400000",
         "--eval-every", "5", "--log-every", "1", "--no-progress"]  # fmt: skip


@pytest.mark.parametrize("model_type", ["encoder-decoder", "decoder-only"])
def test_train_smoke_then_resume_then_eval(tmp_path, capsys, model_type):
    run = tmp_path / "run"
    argv = ["train", "--steps", "5", "--output", str(run), "--model-type", model_type]
    assert main([*argv, "--activation-checkpointing", "1", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "training summary" in out and "final validation loss" in out
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert (run / "training.png").stat().st_size > 10_000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((run / "checkpoints" / "step-00000005" / "config.json").read_text())
    assert saved["model"]["architecture"] == model_type and saved["model"]["vocab_size"] == 600
    assert saved["train"]["activation_checkpointing"] == 1

    # Continue the same run for 3 more steps from its checkpoint.
    assert main(["train", "--resume", "--output", str(run), "--steps", "8", "--no-progress"]) == 0
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 9))

    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "step" in out and " 8 " in out


def test_train_refuses_to_overwrite_a_run_and_resume_needs_output(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--steps", "1", "--output", str(run), *SMALL]) == 0
    assert main(["train", "--steps", "1", "--output", str(run), *SMALL]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["train", "--resume"]) == 2
    assert "--resume needs --output" in capsys.readouterr().err


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "r"), *SMALL]) == 2
    assert "missing.txt" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", "--data", str(empty), "--output", str(tmp_path / "r2"), *SMALL]) == 2
    assert "empty" in capsys.readouterr().err.lower()
    assert main(["train", "--set", "moe.capacity_factor=0", "--output", str(tmp_path / "r3"), *SMALL]) == 2
    assert "capacity_factor=0.0 is invalid" in capsys.readouterr().err

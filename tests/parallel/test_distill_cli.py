"""`switchformer distill` under torchrun: every training is sharded over the ranks (FSDP2, the default layout),
each rank training on its slice of the batch, and logs what one process logs."""

from __future__ import annotations

import json

import pytest

from switchformer.cli.main import main
from tests.parallel.launcher import run_and_check
from tests.parallel.train_workers import distill_cli

TEACHER = ["--preset", "switch-lm-tiny-8", "--set", "d_model=32", "--set", "d_ff=64", "--set", "num_layers=2",
           "--set", "num_heads=2", "--set", "moe.num_experts=4", "--seq-len", "32", "--batch-size", "4",
           "--vocab-size", "600", "--data-set", "max_corpus_bytes=200000", "--eval-every", "2", "--log-every", "1",
           "--train-set", "threads=1", "--no-progress"]  # fmt: skip


def test_sharded_distillation_matches_one_process(tmp_path):
    teacher = tmp_path / "teacher"
    assert main(["train", "--steps", "4", "--output", str(teacher), *TEACHER]) == 0
    args = [str(teacher), "--no-progress"]
    single = distill_cli(args, str(tmp_path / "single"))
    ranks = run_and_check(distill_cli, 2, timeout_s=300, args=args, output=str(tmp_path / "parallel"))
    assert single["rows"] == {4} and [r["rows"] for r in ranks] == [{2}, {2}]  # each rank trains on its half
    for name, expected in single["logs"].items():
        logged = ranks[0]["logs"][name]  # the main rank writes the logs
        assert [r["step"] for r in logged] == [r["step"] for r in expected] == [1, 2, 3, 4], name
        for a, b in zip(logged, expected, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=2e-5), (name, a["step"])
            assert a.get("soft_loss") == pytest.approx(b.get("soft_loss"), abs=2e-5), (name, a["step"])
            if "val_loss" in b:
                assert a["val_loss"] == pytest.approx(b["val_loss"], abs=2e-5), (name, a["step"])
    assert (
        "soft_loss" in single["logs"]["."][0] and "soft_loss" not in single["logs"]["no-teacher"][0]
    )  # the teacher mattered
    one = json.loads((tmp_path / "single" / "distill.json").read_text())
    two = json.loads((tmp_path / "parallel" / "distill.json").read_text())
    for key in ("teacher_loss", "student_loss", "dense_loss", "control_loss"):
        assert two[key] == pytest.approx(one[key], abs=2e-5), key
    assert [r["result"] for r in ranks] == [two, two]  # distill() returns the main rank's result on every rank


def test_a_torchrun_distillation_needs_an_output_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["distill", str(tmp_path / "teacher")]) == 2
    assert "a torchrun launch needs --output" in capsys.readouterr().err

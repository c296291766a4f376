"""``switchformer distill`` on a checkpoint from ``switchformer train``: trains the student and a dense baseline."""

from __future__ import annotations

import argparse
import json

import pytest

from switchformer.cli import distill
from switchformer.cli.main import main
from switchformer.distill import run as distill_run
from switchformer.distill.run import read_result

TINY_MODEL = ["--preset", "switch-lm-tiny-8", "--set", "d_model=32", "--set", "d_ff=64", "--set", "num_layers=2",
              "--set", "num_heads=2", "--set", "moe.num_experts=4"]  # fmt: skip
SMALL_DATA = ["--seq-len", "32", "--batch-size", "4", "--vocab-size", "600", "--data-set", "max_corpus_bytes=200000",
              "--eval-every", "3", "--no-progress"]  # fmt: skip


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="switchformer")
    distill.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["distill", *argv])
    return args.run(args)


def test_distill_a_trained_checkpoint(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    assert main(["train", "--steps", "3", "--output", str(teacher), *TINY_MODEL, *SMALL_DATA]) == 0
    student = tmp_path / "student"
    assert run_cli([str(teacher), "--output", str(student), "--init", "expert:1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "share of the teacher's gain kept" in out and "share due to the soft targets" in out
    result = json.loads((student / "distill.json").read_text())
    control = json.loads((student / "no-teacher" / "summary.json").read_text())
    assert control["steps"] == 3 and result["control_loss"] is not None  # the same student without its teacher
    gain = result["dense_loss"] - result["teacher_loss"]
    expected = (result["control_loss"] - result["student_loss"]) / gain if gain > 0 else None
    assert result["soft_target_share"] == (pytest.approx(expected) if expected is not None else None)
    assert result["steps"] == 3 and result["student_init"] == "expert:1" and result["teacher_weight"] == 0.25
    assert "dense-baseline" in result["baseline"]  # outside a comparison, a dense model is trained from scratch
    assert [r["step"] for r in map(json.loads, (student / "metrics.jsonl").read_text().splitlines())][-1] == 3
    saved = json.loads(next((student / "checkpoints").glob("step-*/config.json")).read_text())
    assert saved["model"]["moe"] is None and saved["distill"]["expert_init"] == "expert"

    assert result["teacher_steps"] == 3 and result["baseline_steps"] == 3
    assert (student / "distill.png").read_bytes().startswith(b"\x89PNG")  # student and control curves

    # A shorter student budget than the teacher's, against a given baseline: each step count is the real one.
    random = tmp_path / "random"
    baseline = result["baseline"]
    argv = [str(teacher), "--output", str(random), "--init", "random", "--steps", "2", "--baseline", baseline]
    assert run_cli([*argv, "--no-progress"]) == 0
    assert not (random / "no-teacher").exists()  # a random-init control would just be the dense baseline again
    short = json.loads((random / "distill.json").read_text())
    assert short["control_loss"] is None and short["baseline"] == baseline
    assert (short["steps"], short["teacher_steps"], short["baseline_steps"]) == (2, 3, 3)
    assert "2 / 3 / 3" in capsys.readouterr().out  # the table's steps of student / teacher / dense baseline
    lines = "\n".join(distill_lines(random))
    assert "(3 steps): validation loss" in lines and "from scratch for 3 steps" in lines
    assert "Dense student distilled for 2 steps" in lines
    assert (random / "distill.png").is_file()  # the student's curve alone: there is no control

    with pytest.raises(ValueError, match="--init='avg'"):
        run_cli([str(teacher), "--init", "avg"])
    with pytest.raises(ValueError, match="dense model"):
        run_cli([str(result["baseline"]), "--output", str(tmp_path / "s2")])


def distill_lines(folder) -> list[str]:
    result = read_result(folder)
    assert result is not None
    return result.lines()


def test_student_training_settings_change_the_student_and_control_but_not_the_baseline(tmp_path):
    teacher = tmp_path / "teacher"
    assert main(["train", "--steps", "3", "--output", str(teacher), *TINY_MODEL, *SMALL_DATA]) == 0
    teacher_train = json.loads(next((teacher / "checkpoints").glob("step-*/config.json")).read_text())["train"]
    student = tmp_path / "student"
    argv = [str(teacher), "--output", str(student), "--lr", "5e-4", "--warmup-steps", "0",
            "--train-set", "schedule=constant", "--no-progress"]  # fmt: skip
    assert run_cli(argv) == 0

    def saved_train(folder):
        return json.loads(sorted((folder / "checkpoints").glob("step-*/config.json"))[-1].read_text())["train"]

    for folder in (student, student / "no-teacher"):  # the student and its control: the new settings
        train = saved_train(folder)
        assert (train["lr"], train["warmup_steps"], train["schedule"]) == (5e-4, 0, "constant")
    baseline = saved_train(student / "dense-baseline")  # from scratch: the teacher's settings
    assert (baseline["lr"], baseline["warmup_steps"]) == (teacher_train["lr"], teacher_train["warmup_steps"])
    assert teacher_train["lr"] != 5e-4 and teacher_train["warmup_steps"] != 0
    result = read_result(student)
    assert result is not None and result.student_overrides == ["lr=0.0005", "warmup_steps=0", "schedule=constant"]
    assert "init mean; lr=0.0005, warmup_steps=0, schedule=constant)" in "\n".join(result.lines())

    with pytest.raises(ValueError, match="set with --steps"):
        run_cli([str(teacher), "--output", str(tmp_path / "s3"), "--train-set", "steps=5", "--no-progress"])
    with pytest.raises(ValueError, match="warmup_steps"):
        run_cli([str(teacher), "--output", str(tmp_path / "s4"), "--warmup-steps", "-1", "--no-progress"])
    assert not (tmp_path / "s3").exists() and not (tmp_path / "s4").exists()  # refused before anything is written


def test_a_seed_override_seeds_the_student_and_its_control_but_not_the_baseline(tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    assert main(["train", "--steps", "2", "--output", str(teacher), *TINY_MODEL, *SMALL_DATA]) == 0
    seeds = []

    def recording(model_config, seed, teacher_model, config):
        seeds.append(seed)
        return initial_student(model_config, seed, teacher_model, config)

    initial_student = distill_run._initial_student
    monkeypatch.setattr(distill_run, "_initial_student", recording)
    student = tmp_path / "student"
    assert run_cli([str(teacher), "--output", str(student), "--train-set", "seed=7", "--no-progress"]) == 0
    assert seeds == [7, 7]  # the student, then its no-teacher control
    saved = json.loads(sorted((student / "checkpoints").glob("step-*/config.json"))[-1].read_text())["train"]
    baseline = json.loads(sorted((student / "dense-baseline" / "checkpoints").glob("step-*/config.json"))[-1]
                          .read_text())["train"]  # fmt: skip
    assert saved["seed"] == 7 and baseline["seed"] == 0  # the baseline keeps the teacher's settings


def test_lr_reaches_the_override_unrounded():
    parser = argparse.ArgumentParser(prog="switchformer")
    distill.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["distill", "teacher", "--lr", "1.23456789e-4", "--warmup-steps", "0"])
    lr, warmup = distill.train_overrides(args)
    assert float(lr.removeprefix("lr=")) == 1.23456789e-4 and warmup == "warmup_steps=0"

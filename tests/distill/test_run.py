"""The distillation result's arithmetic and report lines, worked by hand."""

from __future__ import annotations

import dataclasses
import json

import pytest

from switchformer.distill.run import DistillResult, format_share, read_result, retained_share, soft_target_share


def test_retained_share_worked_example():
    # dense 4.0, teacher 3.5: a gain of 0.5; a student at 3.85 keeps 0.15 of it = 30% (the paper's figure)
    assert retained_share(dense=4.0, student=3.85, teacher=3.5) == pytest.approx(0.30)
    assert retained_share(dense=4.0, student=4.1, teacher=3.5) == pytest.approx(-0.20)  # worse than dense
    assert retained_share(dense=4.0, student=3.9, teacher=4.0) is None  # no gain to keep
    assert retained_share(dense=4.0, student=3.9, teacher=4.2) is None


def test_soft_target_share_separates_the_teacher_from_the_weight_transfer():
    # The student (3.40) beats dense (4.00) by more than the teacher's whole gain (0.50), but the control with
    # the same init and no teacher reaches 3.45: the soft targets account for 0.05 / 0.50 = 10%.
    assert retained_share(dense=4.0, student=3.40, teacher=3.5) == pytest.approx(1.20)
    assert soft_target_share(dense=4.0, teacher=3.5, control=3.45, student=3.40) == pytest.approx(0.10)
    assert soft_target_share(dense=4.0, teacher=3.5, control=3.38, student=3.40) == pytest.approx(-0.04)
    assert soft_target_share(dense=4.0, teacher=4.0, control=3.45, student=3.40) is None


def _result(**changes) -> DistillResult:
    base = DistillResult(teacher="t/step-00000010", baseline="d/step-00000010", steps=10, teacher_loss=3.5,
                         student_loss=3.4, dense_loss=4.0, retained=1.2, teacher_weight=0.25, student_init="mean",
                         control_loss=3.45, soft_target_share=0.1)  # fmt: skip
    return dataclasses.replace(base, **changes)


def test_report_lines_name_the_control_and_its_share():
    text = "\n".join(_result().lines())
    assert "**120%** (paper: about 30%)" in text
    assert "without the teacher (weight 0): 3.4500" in text and "**10%**" in text
    assert "teacher's steps plus its own" in text
    no_control = "\n".join(_result(control_loss=None, soft_target_share=None).lines())
    assert "Control" not in no_control and "**120%**" in no_control
    assert "teacher's steps" not in "\n".join(_result(student_init="random").lines())
    assert "Teacher `t/step-00000010` (10 steps)" in text and "from scratch for 10 steps" in text
    longer = "\n".join(_result(teacher_steps=20000, baseline_steps=20000).lines())
    assert "(20000 steps): validation loss 3.5000" in longer and "from scratch for 20000 steps: 4.0000" in longer
    assert "Dense student distilled for 10 steps" in longer
    assert format_share(None) == "n/a (the teacher is not better than dense)"
    assert format_share(0.1234, 1) == "12.3%"


def test_results_written_before_the_control_existed_still_load(tmp_path):
    old = dataclasses.asdict(_result())
    del old["control_loss"], old["soft_target_share"], old["teacher_steps"], old["baseline_steps"]
    (tmp_path / "distill.json").write_text(json.dumps(old))
    loaded = read_result(tmp_path)
    assert loaded is not None and loaded.control_loss is None and loaded.student_loss == 3.4

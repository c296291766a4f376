"""The student starts as the teacher without experts: non-expert weights copied exactly, FFNs from the experts."""

from __future__ import annotations

import pytest
import torch

from switchformer import ModelConfig, MoEConfig, build_model
from switchformer.distill.student import ExpertInit, init_student_from_teacher, student_config


def _teacher(architecture: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(architecture=architecture, vocab_size=64, d_model=16, d_ff=32, num_heads=2, num_layers=2,
                         dropout=0.0, init_scale=0.1, moe=MoEConfig(num_experts=4))  # fmt: skip
    return build_model(config)


@pytest.mark.parametrize("architecture", ["decoder-only", "encoder-decoder"])
def test_student_copies_non_expert_weights_exactly_and_averages_experts(architecture):
    teacher = _teacher(architecture)
    torch.manual_seed(1)  # a different random init, so nothing matches by accident
    student = build_model(student_config(teacher.config))
    assert student.config.moe is None and student.config.d_ff == teacher.config.d_ff
    done = init_student_from_teacher(student, teacher, ExpertInit.MEAN)
    t, s = teacher.state_dict(), student.state_dict()
    assert done.random == ()  # every student tensor comes from the teacher
    assert set(done.dropped) == {n for n in t if n.endswith("router.weight")}
    for name in done.copied:
        assert torch.equal(s[name], t[name]), name
    sparse_layers = [n.removesuffix("experts.wi") for n in t if n.endswith("experts.wi")]
    assert len(sparse_layers) == (1 if architecture == "decoder-only" else 2)
    for prefix in sparse_layers:
        torch.testing.assert_close(s[prefix + "wi.weight"], t[prefix + "experts.wi"].mean(0).T, rtol=0, atol=0)
        torch.testing.assert_close(s[prefix + "wo.weight"], t[prefix + "experts.wo"].mean(0).T, rtol=0, atol=0)
        # By hand for one entry: the mean over experts of wi[e, d=3, f=5] is the student's wi.weight[f=5, d=3].
        expected = sum(float(t[prefix + "experts.wi"][e, 3, 5]) for e in range(4)) / 4
        assert float(s[prefix + "wi.weight"][5, 3]) == pytest.approx(expected, rel=1e-6)
    assert len(done.from_experts) == 2 * len(sparse_layers)


def test_student_from_one_chosen_expert_and_a_bad_index():
    teacher = _teacher("decoder-only")
    student = build_model(student_config(teacher.config))
    init_student_from_teacher(student, teacher, ExpertInit.EXPERT, expert_index=2)
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["decoder.blocks.1.ffn.wi.weight"], t["decoder.blocks.1.ffn.experts.wi"][2].T)
    assert torch.equal(s["decoder.blocks.1.ffn.wo.weight"], t["decoder.blocks.1.ffn.experts.wo"][2].T)
    with pytest.raises(ValueError, match="expert_index=9"):
        init_student_from_teacher(student, teacher, ExpertInit.EXPERT, expert_index=9)

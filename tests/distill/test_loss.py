"""The distillation loss worked by hand, and a distillation trainer whose loss does not depend on micro-batching."""

from __future__ import annotations

import math

import pytest
import torch

from switchformer import ModelConfig
from switchformer.distill.loss import distillation_loss
from switchformer.distill.trainer import DistillationTrainer, aligned_labels
from switchformer.models.factory import build_model
from switchformer.training.trainer import CyclingBatches


def test_distillation_loss_by_hand():
    # Position 0: student p = (1/4, 3/4), teacher p = (3/4, 1/4), label 0. Position 1 is ignored (-100).
    student = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]], requires_grad=True)
    teacher = torch.tensor([[[math.log(3.0), 0.0], [-9.0, 9.0]]], requires_grad=True)
    labels = torch.tensor([[0, -100]])
    terms = distillation_loss(student, teacher, labels)
    hard = math.log(4.0)  # -log(1/4)
    soft = -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))  # 1.111641...
    assert int(terms.num_tokens) == 1
    assert float(terms.hard_sum.detach()) == pytest.approx(hard)
    assert float(terms.soft_sum.detach()) == pytest.approx(soft)
    mixed = terms.mixed_sum(0.25)
    assert float(mixed.detach()) == pytest.approx(0.75 * hard + 0.25 * soft)  # 1.317631...
    assert float(mixed.detach()) == pytest.approx(1.3176313, rel=1e-6)
    mixed.backward()
    assert teacher.grad is None  # the teacher is a constant
    # d/dz of 0.75 CE + 0.25 soft CE = p_student - (0.75 onehot + 0.25 p_teacher) = (0.25 - 0.9375, 0.75 - 0.0625)
    torch.testing.assert_close(student.grad[0, 0], torch.tensor([-0.6875, 0.6875]))
    torch.testing.assert_close(student.grad[0, 1], torch.zeros(2))


def test_labels_are_aligned_like_the_models_loss():
    labels = torch.tensor([[5, 6, 7]])
    lm, t5 = (
        ModelConfig(architecture=a, vocab_size=64, d_model=16, num_heads=2) for a in ("decoder-only", "encoder-decoder")
    )
    assert aligned_labels(lm, labels).tolist() == [[6, 7, -100]]  # the LM predicts the next token
    assert aligned_labels(t5, labels).tolist() == [[5, 6, 7]]


@pytest.mark.parametrize("architecture", ["decoder-only", "encoder-decoder"])
def test_distillation_trainer_is_micro_batch_invariant_and_weight_zero_is_plain_cross_entropy(
    toy, tmp_path, architecture
):
    tiny_model, batches, train_config = toy
    teacher_config = tiny_model(architecture)
    torch.manual_seed(0)
    teacher = build_model(teacher_config)
    batch = batches(architecture, count=1)[0]
    batch["labels"][0, 5:] = -100
    results = []
    for parts, weight in ((1, 0.25), (4, 0.25), (1, 0.0)):
        trainer = DistillationTrainer(
            teacher_config.dense(),
            train_config(micro_batches=parts),
            train_batches=CyclingBatches([batch]),
            validation=[batch],
            run_dir=tmp_path / f"{parts}-{weight}",
            tensorboard=False,
            teacher=teacher,
            teacher_weight=weight,
        )
        figures = trainer.accumulate_gradients(batch)
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((figures, grads, trainer))
    (one, g_one, trainer), (split, g_split, _), (plain, _, plain_trainer) = results
    assert one["loss"] == pytest.approx(split["loss"], rel=1e-5)
    assert one["loss"] == pytest.approx(0.75 * one["ce_loss"] + 0.25 * one["soft_loss"], rel=1e-6)
    for name in g_one:
        torch.testing.assert_close(g_split[name], g_one[name], atol=1e-6, rtol=1e-4, msg=name)
    out = plain_trainer._forward(batch)
    # Teacher weight 0 is exactly the model's own cross-entropy.
    assert plain["loss"] == pytest.approx(float(out.ce_loss.detach()), rel=1e-5)

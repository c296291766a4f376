"""The distillation loss of the paper (section 4.2): ground truth mixed with the teacher's probabilities.

``loss = (1 - w) * CE(student, labels) + w * CE(student, softmax(teacher))`` over the label positions, with
``w = 0.25`` in the paper. The soft term is a cross-entropy against the teacher's full distribution (it differs
from KL(teacher || student) by the teacher's entropy, a constant for the student). Both terms are token *sums*
here, so the caller can normalise by the label count of a whole batch split into micro-batches.

Shape legend: B batch, S label positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from switchformer.labels import IGNORE_INDEX


@dataclasses.dataclass
class DistillationLoss:
    """Token sums of both terms over the counted positions, and how many positions counted."""

    hard_sum: torch.Tensor  # [] sum of -log p_student(label)
    soft_sum: torch.Tensor  # [] sum of -sum_v p_teacher(v) log p_student(v)
    num_tokens: torch.Tensor  # [] label positions that count (labels != -100)

    def mixed_sum(self, teacher_weight: float) -> torch.Tensor:
        return (1.0 - teacher_weight) * self.hard_sum + teacher_weight * self.soft_sum


def distillation_loss(
    student_logits_BSV: torch.Tensor, teacher_logits_BSV: torch.Tensor, labels_BS: torch.Tensor
) -> DistillationLoss:
    """Both loss terms for logits aligned with ``labels_BS`` (positions labelled -100 count in neither).

    Computed in float32; the teacher's logits are treated as constants.
    """
    if student_logits_BSV.shape != teacher_logits_BSV.shape:
        raise ValueError(
            f"student logits {tuple(student_logits_BSV.shape)} and teacher logits "
            f"{tuple(teacher_logits_BSV.shape)} differ: teacher and student must share the vocabulary"
        )
    vocab = student_logits_BSV.shape[-1]
    mask_N = labels_BS.reshape(-1) != IGNORE_INDEX
    student_logp_NV = F.log_softmax(student_logits_BSV.float().reshape(-1, vocab)[mask_N], dim=-1)
    teacher_p_NV = F.softmax(teacher_logits_BSV.detach().float().reshape(-1, vocab)[mask_N], dim=-1)
    hard = F.nll_loss(student_logp_NV, labels_BS.reshape(-1)[mask_N], reduction="sum")
    soft = -(teacher_p_NV * student_logp_NV).sum()
    return DistillationLoss(hard, soft, mask_N.sum())

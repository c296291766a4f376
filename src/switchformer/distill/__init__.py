"""Distillation of a Switch teacher into a dense student (``switchformer distill``; paper, section 4.2)."""

from switchformer.distill.config import DistillConfig
from switchformer.distill.loss import DistillationLoss, distillation_loss
from switchformer.distill.run import DistillResult, distill, retained_share
from switchformer.distill.student import ExpertInit, StudentInit, init_student_from_teacher, student_config
from switchformer.distill.trainer import DistillationTrainer, aligned_labels

__all__ = [
    "DistillConfig",
    "DistillResult",
    "DistillationLoss",
    "DistillationTrainer",
    "ExpertInit",
    "StudentInit",
    "aligned_labels",
    "distill",
    "distillation_loss",
    "init_student_from_teacher",
    "retained_share",
    "student_config",
]

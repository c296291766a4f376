"""Settings of a distillation run (paper, section 4.2)."""

from __future__ import annotations

import dataclasses

from switchformer.config import Config
from switchformer.distill.student import ExpertInit


@dataclasses.dataclass
class DistillConfig(Config):
    teacher_weight: float = 0.25  # share of the loss against the teacher's probabilities (paper: 0.25)
    expert_init: ExpertInit = ExpertInit.MEAN  # how a Switch FFN becomes the student's dense FFN
    expert_index: int = 0  # the expert copied with expert_init='expert'
    init_from_teacher: bool = True  # False: random student init (the paper's ablation without weight transfer)

    def validate(self) -> None:
        self.check(0 <= self.teacher_weight <= 1, "teacher_weight", "must be in [0, 1] (paper: 0.25)")
        self.check(self.expert_index >= 0, "expert_index", "must be >= 0")

    def describe_init(self) -> str:
        """``mean``, ``expert:N`` or ``random``: the form the command line takes."""
        if not self.init_from_teacher:
            return "random"
        return "mean" if self.expert_init is ExpertInit.MEAN else f"expert:{self.expert_index}"

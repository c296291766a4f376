"""A :class:`Trainer` whose loss mixes ground truth with a frozen teacher's probabilities.

Only the loss changes: the loop, schedule, checkpoints, evaluation (the student's plain cross-entropy on the
validation set) and resume are the trainer's. The teacher runs in eval mode (no router jitter, the evaluation
capacity factor) without gradients; its forward pass counts in the student's step time, as it would in practice.
Under torchrun (data parallelism: the student is dense) every rank holds the whole teacher and runs it on its slice.
"""

from __future__ import annotations

from typing import Any

import torch

from switchformer.distill.loss import distillation_loss
from switchformer.labels import IGNORE_INDEX
from switchformer.models.base import SwitchModelBase
from switchformer.models.config import ModelConfig
from switchformer.training.evaluation import model_forward
from switchformer.training.trainer import Batch, Trainer, local_micro_batches


def aligned_labels(config: ModelConfig, labels_BS: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits: a decoder-only model predicts token t + 1 at position t (it shifts inside)."""
    if config.is_encoder_decoder:
        return labels_BS
    shifted = torch.full_like(labels_BS, IGNORE_INDEX)
    shifted[:, :-1] = labels_BS[:, 1:]
    return shifted


class DistillationTrainer(Trainer):
    """Trains the student (``model_config``) against ``teacher`` with ``teacher_weight`` of soft targets."""

    def __init__(self, *args: Any, teacher: SwitchModelBase, teacher_weight: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.device).eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.teacher_weight = teacher_weight

    def accumulate_gradients(self, batch: Batch) -> dict[str, float]:
        """Backward of the mixed loss, normalised by the label count of the whole batch (split-invariant); under
        data parallelism each rank takes its slice, as in :meth:`Trainer.accumulate_gradients`."""
        self.model.train()
        total = int((aligned_labels(self.model_config, batch["labels"]) != IGNORE_INDEX).sum())
        world = self.strategy.world_size  # each rank's share of the global mean: averaging over W divides again
        hard = soft = 0.0
        micro = local_micro_batches(batch, self.config.micro_batches, self.strategy)
        for index, part in enumerate(micro):
            self.strategy.gradient_sync(self.model, index == len(micro) - 1)  # reduce once, after the last
            with self.strategy.batch_slicing():  # the teacher's routing groups may span the ranks' slices
                with torch.no_grad():
                    teacher_out = model_forward(self.teacher, part, self.device, self.amp_dtype, return_logits=True)
                out = model_forward(self.model, part, self.device, self.amp_dtype, return_logits=True)
            labels = aligned_labels(self.model_config, part["labels"]).to(self.device)
            terms = distillation_loss(out.logits, teacher_out.logits, labels)
            (terms.mixed_sum(self.teacher_weight) * world / max(total, 1)).backward()
            hard += float(terms.hard_sum.detach()) * world / max(total, 1)
            soft += float(terms.soft_sum.detach()) * world / max(total, 1)
        figures = self.strategy.mean({"ce_loss": hard, "soft_loss": soft})
        mixed = (1.0 - self.teacher_weight) * figures["ce_loss"] + self.teacher_weight * figures["soft_loss"]
        zero = {"aux_loss": 0.0, "load_balancing_loss": 0.0, "z_loss": 0.0, "dropped_fraction": 0.0}
        return {"loss": mixed, **figures, **zero}

"""Training: the ``pretrain()`` entry point, config, optimizers and schedules, the loop, checkpoints, metrics and
progress."""

from switchformer.training.config import TrainConfig
from switchformer.training.pretrain import JobOptions, RunConfigs, build_trainer, pretrain, train_prepared
from switchformer.training.trainer import Trainer

__all__ = ["JobOptions", "RunConfigs", "TrainConfig", "Trainer", "build_trainer", "pretrain", "train_prepared"]

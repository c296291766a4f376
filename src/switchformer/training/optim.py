"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math
from typing import Any

import torch

from switchformer.training.config import OptimizerKind, Schedule, TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig, *, layout: Any = None) -> torch.optim.Optimizer:
    """AdamW (weight decay on matrices only) or Adafactor, the paper's optimizer.

    ``layout`` (a ``ParallelLayout``) is given for a sharded ``model``: Adafactor then takes its norms and column
    statistics over whole weights, not this rank's shards (``parallel.adafactor``); AdamW is elementwise and runs
    on the shards (DTensors) as it is.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer is OptimizerKind.ADAFACTOR:
        if layout is not None:
            from switchformer.parallel.adafactor import ShardedAdafactor

            return ShardedAdafactor(params, lr=config.lr, weight_decay=config.weight_decay)
        return torch.optim.Adafactor(params, lr=config.lr, weight_decay=config.weight_decay)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fused_adam_supported(params))
    optimizer.register_load_state_dict_pre_hook(_keep_this_runs_kernel)
    return optimizer


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """The name a checkpoint records for its optimizer state: the class, unless the class says its state is another's
    (the expert-parallel Adafactor keeps torch's Adafactor state, so its checkpoints resume in one process)."""
    return getattr(optimizer, "checkpoint_kind", type(optimizer).__name__)


def fused_adam_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel can update ``params``.

    Why it matters: on CPU, torch's default AdamW runs about ten elementwise passes over each tensor, which for
    a Switch model's expert weights (tens of millions of parameters) costs as much as a large share of the step;
    the fused kernel makes one vectorised pass (measured by ``bench/bench_optimizer.py``, figures in
    docs/performance.md). Same arithmetic, same state dict, so checkpoints move freely between the two.
    """
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def _keep_this_runs_kernel(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A saved optimizer state carries the saving run's kernel flags (``fused``, ``foreach``); without this a
    resume from an older checkpoint, or from another device's, would quietly switch kernels. Keeping the flags
    before torch loads the state also lets torch place the step counters where the fused kernel wants them."""
    kernel = ("fused", "foreach")
    groups = [
        {**saved, **{key: own[key] for key in kernel if key in own}}
        for saved, own in zip(state["param_groups"], optimizer.param_groups, strict=False)
    ]
    return {**state, "param_groups": groups}


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` at ``step`` (0-based: the update about to be applied)."""
    warmup = max(config.warmup_steps, 1)
    if config.schedule is Schedule.INVERSE_SQRT:
        # T5's rsqrt schedule normalised so it equals 1 at the end of warmup (constant during warmup).
        return math.sqrt(warmup / max(step + 1, warmup))
    if step < config.warmup_steps:
        return (step + 1) / warmup
    if config.schedule is Schedule.CONSTANT:
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))

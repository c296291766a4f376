"""Load a checkpoint for fine-tuning with the paper's expert dropout.

Dropout rates are fixed when the modules are built, so the model is built (on the meta device) from a config
carrying the new rates and then filled from the checkpoint (no random init): ``dropout`` reaches every non-expert
layer (attention, residual branches, embeddings, dense FFNs) and ``moe.expert_dropout`` the hidden layer inside each
expert.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from switchformer.interop.checkpoint_io import OpenCheckpoint, open_checkpoint
from switchformer.interop.key_map import expected_shapes
from switchformer.models.base import SwitchModelBase
from switchformer.models.config import ModelConfig
from switchformer.models.factory import build_model

logger = logging.getLogger(__name__)


def with_dropout(config: ModelConfig, *, dropout: float, expert_dropout: float) -> ModelConfig:
    """``config`` with ``dropout`` outside the experts and ``expert_dropout`` inside them (paper: 0.1 and 0.4)."""
    moe = config.moe.replace(expert_dropout=expert_dropout) if config.moe is not None else None
    if moe is None:
        logger.info("dense model: expert_dropout=%s has no experts to apply to", expert_dropout)
    return config.replace(dropout=dropout, moe=moe)


def open_for_finetuning(
    path: str | Path,
    *,
    dropout: float = 0.1,
    expert_dropout: float = 0.4,
    overrides: Iterable[str] = (),
    dtype: torch.dtype | None = torch.float32,
) -> tuple[SwitchModelBase, OpenCheckpoint]:
    """A meta-device model built with the fine-tuning dropout rates and ``overrides`` in ``dtype`` (routers
    float32), and the checkpoint whose :meth:`~OpenCheckpoint.fill` loads it once allocated (whole, or each
    rank's shards). Overrides must keep the weights' names and shapes."""
    checkpoint = open_checkpoint(path)
    config = with_dropout(checkpoint.config, dropout=dropout, expert_dropout=expert_dropout).with_overrides(overrides)
    before, after = expected_shapes(checkpoint.config), expected_shapes(config)
    if before != after:
        changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
        raise ValueError(
            f"the overrides change the weights' names or shapes ({', '.join(changed[:4])}), so the checkpoint "
            "cannot be loaded into them"
        )
    with torch.device("meta"):
        model = build_model(config)
    return checkpoint.cast(model, dtype), checkpoint


def load_for_finetuning(
    path: str | Path,
    *,
    dropout: float = 0.1,
    expert_dropout: float = 0.4,
    overrides: Iterable[str] = (),
    dtype: torch.dtype | None = torch.float32,
) -> SwitchModelBase:
    """A switchformer checkpoint, training run folder (its latest checkpoint) or Hugging Face Switch folder, rebuilt
    with the fine-tuning dropout rates and optional ``ModelConfig`` overrides (``moe.capacity_factor=1.0``) that
    keep the weights' shapes, in training mode. Hugging Face folders keep their routing semantics (fixed capacity
    per sequence)."""
    model, checkpoint = open_for_finetuning(
        path, dropout=dropout, expert_dropout=expert_dropout, overrides=overrides, dtype=dtype
    )
    model.to_empty(device="cpu")
    checkpoint.fill(model)
    return model.train()

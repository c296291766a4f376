"""Load a checkpoint for fine-tuning with the paper's expert dropout.

Dropout rates are fixed when the modules are built, so the model is rebuilt from a config carrying the new rates
and adopts the loaded weights (no copy, no random init): ``dropout`` reaches every non-expert layer (attention,
residual branches, embeddings, dense FFNs) and ``moe.expert_dropout`` the hidden layer inside each expert.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from switchformer.interop.checkpoint_io import from_pretrained, model_from_state_dict
from switchformer.models.base import SwitchModelBase
from switchformer.models.config import ModelConfig

logger = logging.getLogger(__name__)


def with_dropout(config: ModelConfig, *, dropout: float, expert_dropout: float) -> ModelConfig:
    """``config`` with ``dropout`` outside the experts and ``expert_dropout`` inside them (paper: 0.1 and 0.4)."""
    moe = config.moe.replace(expert_dropout=expert_dropout) if config.moe is not None else None
    if moe is None:
        logger.info("dense model: expert_dropout=%s has no experts to apply to", expert_dropout)
    return config.replace(dropout=dropout, moe=moe)


def rebuild(model: SwitchModelBase, config: ModelConfig) -> SwitchModelBase:
    """A model built for ``config`` holding ``model``'s weights (shapes must agree), in training mode."""
    try:
        return model_from_state_dict(config, model.state_dict(), dtype=None).train()
    except RuntimeError as error:  # load_state_dict: missing/unexpected keys or shape mismatches
        raise ValueError(
            f"the overrides change the weights' names or shapes, so the checkpoint cannot be loaded into them: {error}"
        ) from None


def load_for_finetuning(
    path: str | Path,
    *,
    dropout: float = 0.1,
    expert_dropout: float = 0.4,
    overrides: Iterable[str] = (),
) -> SwitchModelBase:
    """A switchformer checkpoint, training run folder (its latest checkpoint) or Hugging Face Switch folder, rebuilt
    with the fine-tuning dropout rates and optional ``ModelConfig`` overrides (``moe.capacity_factor=1.0``) that
    keep the weights' shapes. Hugging Face folders keep their routing semantics (fixed capacity per sequence)."""
    loaded = from_pretrained(path)
    config = with_dropout(loaded.config, dropout=dropout, expert_dropout=expert_dropout).with_overrides(overrides)
    return rebuild(loaded, config)

"""Build the model a config describes."""

from __future__ import annotations

from switchformer.models.base import SwitchModelBase
from switchformer.models.config import Architecture, ModelConfig
from switchformer.models.decoder_only import SwitchLM
from switchformer.models.encoder_decoder import SwitchTransformer


def build_model(config: ModelConfig) -> SwitchModelBase:
    """A :class:`SwitchTransformer` or :class:`SwitchLM`, initialised as in the paper (under the current device)."""
    if config.architecture is Architecture.ENCODER_DECODER:
        return SwitchTransformer(config)
    return SwitchLM(config)

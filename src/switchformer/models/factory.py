"""Build the model a config describes."""

from __future__ import annotations

import torch

from switchformer.models.base import SwitchModelBase
from switchformer.models.config import Architecture, ModelConfig
from switchformer.models.decoder_only import SwitchLM
from switchformer.models.encoder_decoder import SwitchTransformer


def build_model(
    config: ModelConfig, *, seed: int | None = None, device: torch.device | str | None = None
) -> SwitchModelBase:
    """A :class:`SwitchTransformer` or :class:`SwitchLM`, initialised as in the paper on ``device`` (default: the
    current default device).

    ``device="meta"`` allocates nothing: apply parallelism, then materialise each rank's shards
    (``switchformer.parallel.materialize``). ``seed`` names the weights' random streams (see
    :meth:`SwitchModelBase.reset_parameters`); without it one is drawn from torch's global generator.
    """
    architecture = SwitchTransformer if config.architecture is Architecture.ENCODER_DECODER else SwitchLM
    with torch.device("meta"):
        model = architecture(config)
    if torch.device(device or torch.get_default_device()).type == "meta":
        return model
    model.to_empty(device=device or torch.get_default_device())
    model.reset_parameters(seed)
    return model

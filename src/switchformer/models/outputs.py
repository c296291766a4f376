"""Typed results of the models' forward passes."""

from __future__ import annotations

import dataclasses

import torch

from switchformer.layers.kv_cache import DecoderCache
from switchformer.moe.losses import RouterStats


@dataclasses.dataclass
class LayerRouting:
    """Losses and statistics of one Switch layer, named by its place in the model (``encoder.1``)."""

    name: str
    load_balancing_loss: torch.Tensor  # [] unweighted, with gradient
    z_loss: torch.Tensor  # [] unweighted, with gradient
    stats: RouterStats  # detached


@dataclasses.dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, S, V] (decoder positions); None when the forward got return_logits=False
    loss: torch.Tensor | None  # ce_loss + aux_loss, when labels were given
    ce_loss: torch.Tensor | None  # mean token cross-entropy over labels != -100
    aux_loss: torch.Tensor  # lb_coef * load_balancing_loss + z_coef * z_loss (0 for a dense model)
    load_balancing_loss: torch.Tensor  # [] mean over Switch layers, unweighted
    z_loss: torch.Tensor  # [] mean over Switch layers, unweighted
    num_label_tokens: torch.Tensor | None  # [] number of labels that count in ce_loss
    router: list[LayerRouting]  # one entry per Switch layer, encoder first
    hidden_states: torch.Tensor  # [B, S, D] final decoder (or LM) hidden states
    encoder_hidden_states: torch.Tensor | None  # [B, M, D] (encoder-decoder only)
    cache: DecoderCache | None  # for the next incremental decoding step when use_cache=True

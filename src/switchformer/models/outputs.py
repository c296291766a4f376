"""Typed results of the models' forward passes."""

from __future__ import annotations

import dataclasses

import torch

from switchformer.computed_once import computed_once
from switchformer.layers.kv_cache import DecoderCache
from switchformer.moe.layer import MoEOutput
from switchformer.moe.losses import RouterStats


@dataclasses.dataclass
class LayerRouting:
    """Losses and statistics of one Switch layer, named by its place in the model (``encoder.1``); computed from
    the layer's routing when first read."""

    name: str
    layer: MoEOutput

    @property
    def load_balancing_loss(self) -> torch.Tensor:
        """[] unweighted, with gradient."""
        return self.layer.load_balancing_loss

    @property
    def z_loss(self) -> torch.Tensor:
        """[] unweighted, with gradient."""
        return self.layer.z_loss

    @property
    def stats(self) -> RouterStats:
        """Detached statistics."""
        return self.layer.stats


@dataclasses.dataclass
class ModelOutput:
    """A forward's results. The router losses are averaged over the Switch layers when first read (a decoding step
    reads none of them; a forward with labels reads them for ``loss``)."""

    logits: torch.Tensor | None  # [B, S, V] (decoder positions); None when the forward got return_logits=False
    loss: torch.Tensor | None  # ce_loss + aux_loss, when labels were given
    ce_loss: torch.Tensor | None  # mean token cross-entropy over labels != -100
    num_label_tokens: torch.Tensor | None  # [] number of labels that count in ce_loss
    router: list[LayerRouting]  # one entry per Switch layer, encoder first
    hidden_states: torch.Tensor  # [B, S, D] final decoder (or LM) hidden states
    encoder_hidden_states: torch.Tensor | None  # [B, M, D] (encoder-decoder only)
    cache: DecoderCache | None  # for the next incremental decoding step when use_cache=True
    aux_coefficients: tuple[float, float] = (0.0, 0.0)  # (load-balancing, z-loss) weights in aux_loss

    @computed_once
    def load_balancing_loss(self) -> torch.Tensor:
        """[] mean over Switch layers, unweighted (0 for a dense model)."""
        return self._mean_over_layers([r.load_balancing_loss for r in self.router])

    @computed_once
    def z_loss(self) -> torch.Tensor:
        """[] mean over Switch layers, unweighted (0 for a dense model)."""
        return self._mean_over_layers([r.z_loss for r in self.router])

    @computed_once
    def aux_loss(self) -> torch.Tensor:
        """``lb_coef * load_balancing_loss + z_coef * z_loss`` (0 for a dense model)."""
        lb_coef, z_coef = self.aux_coefficients
        return self.load_balancing_loss * lb_coef + self.z_loss * z_coef

    def _mean_over_layers(self, losses: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(losses).mean() if losses else self.hidden_states.new_zeros((), dtype=torch.float32)

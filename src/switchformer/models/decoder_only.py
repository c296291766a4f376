"""A decoder-only causal language model built from the same T5 blocks and Switch layers."""

from __future__ import annotations

import torch

from switchformer.labels import IGNORE_INDEX
from switchformer.layers.kv_cache import DecoderCache
from switchformer.models.base import SwitchModelBase
from switchformer.models.config import Architecture, ModelConfig, Stack
from switchformer.models.outputs import ModelOutput
from switchformer.models.stack import TransformerStack


class SwitchLM(SwitchModelBase):
    """Causal LM: ``forward(input_ids, labels=input_ids)`` predicts token ``t + 1`` from tokens ``<= t``.

    Labels are aligned with the inputs and shifted inside (the Hugging Face causal-LM convention).
    """

    def __init__(self, config: ModelConfig) -> None:
        if config.architecture is not Architecture.DECODER_ONLY:
            raise ValueError(f"SwitchLM needs architecture='decoder-only', got {config.architecture.value!r}")
        super().__init__(config)
        self.decoder = TransformerStack(config, Stack.DECODER)
        self.finish_init()

    def count_labels(self, labels: torch.Tensor) -> int:
        """Labels are shifted inside: position 0 is never predicted."""
        return int((labels[:, 1:] != IGNORE_INDEX).sum())

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
        use_cache: bool = False,
        return_logits: bool = True,
    ) -> ModelOutput:
        decoder = self.decoder(self.shared(input_ids), attention_mask=attention_mask, cache=cache, use_cache=use_cache)
        shifted = None
        if labels is not None:
            shifted = torch.full_like(labels, IGNORE_INDEX)
            shifted[:, :-1] = labels[:, 1:]
        return self.assemble_output(
            decoder.hidden_states, [("decoder", decoder)], shifted, cache=decoder.cache, return_logits=return_logits
        )

"""The T5-style encoder-decoder Switch Transformer (the paper's Switch-Base ... Switch-C, and dense T5)."""

from __future__ import annotations

import torch

from switchformer.labels import IGNORE_INDEX
from switchformer.layers.kv_cache import DecoderCache
from switchformer.models.base import SwitchModelBase
from switchformer.models.config import Architecture, ModelConfig, Stack
from switchformer.models.outputs import ModelOutput
from switchformer.models.stack import StackOutput, TransformerStack


class SwitchTransformer(SwitchModelBase):
    """Encoder (bidirectional self-attention) and decoder (causal self-attention plus cross-attention).

    ``forward(input_ids, labels=...)`` returns a :class:`ModelOutput` whose ``loss`` is the token cross-entropy
    plus the weighted auxiliary losses averaged over Switch layers. For incremental decoding, run
    :meth:`encode` once and call ``forward(decoder_input_ids=..., encoder_hidden_states=..., cache=...,
    use_cache=True)`` with one new position at a time.
    """

    def __init__(self, config: ModelConfig) -> None:
        if config.architecture is not Architecture.ENCODER_DECODER:
            raise ValueError(
                f"SwitchTransformer needs architecture='encoder-decoder', got {config.architecture.value!r}"
            )
        super().__init__(config)
        self.encoder = TransformerStack(config, Stack.ENCODER)
        self.decoder = TransformerStack(config, Stack.DECODER)
        self.finish_init()

    def shift_right(self, labels_BS: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for teacher forcing: start token, then the labels without the last (ignored ones -> pad)."""
        shifted = labels_BS.new_full(labels_BS.shape, self.config.decoder_start_token_id)
        shifted[:, 1:] = labels_BS[:, :-1]
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> StackOutput:
        return self.encoder(self.shared(input_ids), attention_mask=attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        encoder_output: StackOutput | None = None,
        cache: DecoderCache | None = None,
        use_cache: bool = False,
        return_logits: bool = True,
    ) -> ModelOutput:
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass labels (for training) or decoder_input_ids (for decoding)")
            decoder_input_ids = self.shift_right(labels)
        if encoder_output is None:
            if input_ids is None:
                raise ValueError("pass input_ids, or encoder_output from a previous call to encode()")
            encoder_output = self.encode(input_ids, attention_mask)
        # Positions whose label is ignored are padding: keep them out of expert slots and the router losses.
        routing_mask = labels != IGNORE_INDEX if labels is not None and decoder_attention_mask is None else None
        decoder = self.decoder(
            self.decoder_embedding(decoder_input_ids),
            attention_mask=decoder_attention_mask,
            memory_BMD=encoder_output.hidden_states,
            memory_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            routing_mask=routing_mask,
        )
        stacks = [("encoder", encoder_output)] if cache is None else []
        stacks.append(("decoder", decoder))
        return self.assemble_output(
            decoder.hidden_states,
            stacks,
            labels,
            encoder_hidden_states=encoder_output.hidden_states,
            cache=decoder.cache,
            return_logits=return_logits,
        )

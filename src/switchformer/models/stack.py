"""A stack of T5 blocks sharing one relative position bias: the encoder, or a (cross-attending) decoder.

Shape legend: B batch, S new positions, P cached positions, L = P + S key positions, M memory (encoder) length.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.utils.checkpoint
from torch import nn

from switchformer.layers.kv_cache import DecoderCache, StaticDecoderCache
from switchformer.layers.norm import RMSNorm
from switchformer.layers.position_bias import RelativePositionBias
from switchformer.models.block import TransformerBlock
from switchformer.models.config import ModelConfig, Stack
from switchformer.moe.batch_slices import contexts_for_recompute
from switchformer.moe.config import RoutingCaveatWarning, RoutingPriority
from switchformer.moe.layer import MoEOutput


@dataclasses.dataclass
class StackOutput:
    hidden_states: torch.Tensor  # [B, S, D] after the final norm
    moe_outputs: list[tuple[int, MoEOutput]]  # (layer index, output) of each Switch layer, in order
    cache: DecoderCache | None


CONFIDENCE_IN_A_DECODER = (
    "MoEConfig.priority='confidence' with a capacity (dropless=False) in a decoder stack: a later token can take an "
    "earlier token's expert slot, so earlier positions' outputs depend on later tokens (the model is not causal, "
    "and cached decoding differs from training). Use priority='position' or dropless=True for a causal model; see "
    "docs/routing-caveats.md"
)


def _mask_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def _new_positions(mask_BL: torch.Tensor, past: int | torch.Tensor, new: int) -> torch.Tensor:
    """The mask's ``new`` positions from ``past`` on (an int, or a static cache's position tensor)."""
    if isinstance(past, torch.Tensor):
        return mask_BL.index_select(1, past + torch.arange(new, device=mask_BL.device))
    return mask_BL[:, past : past + new]


class TransformerStack(nn.Module):
    def __init__(self, config: ModelConfig, stack: Stack) -> None:
        """The encoder (bidirectional), or a decoder: causal, cross-attending in an encoder-decoder."""
        super().__init__()
        causal = stack is Stack.DECODER
        cross_attention = causal and config.is_encoder_decoder
        sparse = set(config.switch_layers(stack))
        moe = config.moe
        if causal and sparse and moe is not None and moe.priority is RoutingPriority.CONFIDENCE and not moe.dropless:
            warnings.warn(CONFIDENCE_IN_A_DECODER, RoutingCaveatWarning, stacklevel=3)
        self.causal = causal
        self.route_padding = config.moe is None or not config.moe.ignore_padding_tokens
        self.position_bias = RelativePositionBias(
            config.num_heads,
            bidirectional=not causal,
            num_buckets=config.relative_attention_num_buckets,
            max_distance=config.relative_attention_max_distance,
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(config, sparse=i in sparse, cross_attention=cross_attention)
            for i in range(config.stack_layers(stack))
        )
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.checkpoint_every = 0  # activation checkpointing: see set_activation_checkpointing
        # torch.compile'd twins of the blocks (same parameters) for training forwards; see training.compiled
        self.compiled_blocks: list[nn.Module] | None = None

    def forward(
        self,
        embeds_BSD: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        memory_BMD: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
        use_cache: bool = False,
        routing_mask: torch.Tensor | None = None,
    ) -> StackOutput:
        """``attention_mask`` is ``[B, L]`` (cached positions included), ``memory_mask`` is ``[B, M]``.

        With a :class:`StaticDecoderCache` the keys are all of its ``P`` positions: ``attention_mask`` is then
        ``[B, P]``, and the causal mask hides the positions not yet written.

        ``routing_mask`` (``[B, S]``) marks the new positions that are real tokens for the Switch layers; it
        defaults to the attention mask's new positions. Padding then claims no expert slot and counts in no loss,
        unless the MoE config sets ``ignore_padding_tokens=False``.
        """
        new = embeds_BSD.shape[1]
        device = embeds_BSD.device
        past: int | torch.Tensor
        if isinstance(cache, StaticDecoderCache):  # fixed shapes: all its positions, the new ones at a tensor offset
            past, total = cache.position, cache.capacity
        else:
            past = cache.length if cache is not None else 0
            total = past + new

        self_bias = self.position_bias(new, total, query_offset=past)  # [1, H, S, L]
        neg = _mask_value(self_bias.dtype)  # float32, or bf16 where the weights are (float32's would overflow it)
        blocked = torch.zeros(1, 1, new, total, dtype=torch.bool, device=device)
        if self.causal:
            query_pos = torch.arange(new, device=device)[:, None] + past
            blocked = blocked | (torch.arange(total, device=device)[None, :] > query_pos)[None, None]
        if attention_mask is not None:
            blocked = blocked | ~attention_mask.bool()[:, None, None, :]
        self_bias = self_bias.masked_fill(blocked, neg)

        cross_bias = None
        if memory_BMD is not None:
            bias_dtype = torch.promote_types(self_bias.dtype, torch.float32)  # float32, or a float64 model's
            cross_bias = torch.zeros(1, 1, 1, memory_BMD.shape[1], device=device, dtype=bias_dtype)
            if memory_mask is not None:
                cross_bias = cross_bias.masked_fill(~memory_mask.bool()[:, None, None, :], neg)

        token_mask = None
        if not self.route_padding:
            if routing_mask is not None:
                token_mask = routing_mask.bool()
            elif attention_mask is not None:
                token_mask = _new_positions(attention_mask, past, new).bool()

        hidden = self.dropout(embeds_BSD)
        moe_outputs: list[tuple[int, MoEOutput]] = []
        new_cache = DecoderCache.empty(len(self.blocks)) if use_cache else None
        training_pass = torch.is_grad_enabled() and cache is None and not use_cache
        recompute = self.checkpoint_every > 0 and training_pass
        runners = self.compiled_blocks if self.compiled_blocks is not None and training_pass else self.blocks
        for i, block in enumerate(runners):
            inputs = {
                "self_bias": self_bias,
                "token_mask": token_mask,
                "memory_BMD": memory_BMD,
                "cross_bias": cross_bias,
                "self_kv": cache.self_attention[i] if cache is not None else None,
                "cross_kv": cache.cross_attention[i] if cache is not None else None,
                "keep_cross_kv": new_cache is not None,  # a forward without a cache need not project the memory
            }
            if recompute and i % self.checkpoint_every == 0:
                # Keep only the block's input; its forward runs again in the backward pass, with the same dropout
                # and jitter noise (the RNG state is restored), in the same batch slice and, under expert
                # parallelism, the same all-to-alls.
                out = torch.utils.checkpoint.checkpoint(
                    block, hidden, use_reentrant=False, context_fn=contexts_for_recompute, **inputs
                )
            else:
                out = block(hidden, **inputs)
            hidden = out.hidden_states
            if out.moe is not None:
                moe_outputs.append((i, out.moe))
            if new_cache is not None:
                new_cache.self_attention[i] = out.self_kv
                new_cache.cross_attention[i] = out.cross_kv
        hidden = self.dropout(self.final_norm(hidden))
        return StackOutput(hidden, moe_outputs, new_cache)


def set_activation_checkpointing(model: nn.Module, every: int) -> int:
    """Recompute every ``every``-th block's activations in the backward pass (1 = every block, 0 = off).

    Why: a block then keeps only its inputs alive between forward and backward (its ``[B, S, D]`` hidden states;
    the attention bias and encoder output it shares with the other blocks), so activation memory falls from all
    of a block's intermediate tensors (attention probabilities, the experts' hidden layer, ...) to one ``[B, S, D]``
    tensor per checkpointed block, for about one extra forward pass of compute. Only training forwards with
    gradients are affected; evaluation and cached decoding run as before. Returns the number of stacks changed.
    """
    if not isinstance(every, int) or every < 0:
        raise ValueError(f"activation checkpointing every={every} must be >= 0 (0 = off, 1 = every block)")
    stacks = transformer_stacks(model, "checkpoint") if every else transformer_stacks(model)
    for stack in stacks:
        stack.checkpoint_every = every
    return len(stacks)


def transformer_stacks(model: nn.Module, required_to: str | None = None) -> list[TransformerStack]:
    """The stacks of ``model``; with ``required_to`` (what the caller will do to them) a model without one is an
    error that says so."""
    stacks = [m for m in model.modules() if isinstance(m, TransformerStack)]
    if required_to and not stacks:
        raise ValueError(f"{type(model).__name__} has no TransformerStack to {required_to}; build it with build_model")
    return stacks

"""Parameter and FLOP counts, computed without allocating the model (parameters built on the meta device)."""

from __future__ import annotations

import dataclasses

import torch

from switchformer.models.config import ModelConfig, Stack
from switchformer.moe.layer import SwitchFFN


@dataclasses.dataclass
class ModelSize:
    params_total: int  # every parameter, tied embeddings counted once
    params_active: int  # parameters a single token uses (top_k experts of each Switch layer)
    flops_per_token: int  # forward FLOPs, see flops_per_token()

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def count_parameters(config: ModelConfig) -> tuple[int, int]:
    """``(total, active)`` parameter counts of the model ``config`` describes, on the meta device."""
    from switchformer.models.factory import build_model

    with torch.device("meta"):
        model = build_model(config)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, SwitchFFN):
            experts = module.experts
            per_expert = (experts.wi.numel() + experts.wo.numel()) // experts.num_experts
            inactive += per_expert * (experts.num_experts - module.config.moe.top_k)
    return total, total - inactive


def flops_per_token(config: ModelConfig, *, context_length: int = 512) -> int:
    """Forward FLOPs (2 per multiply-add) for one token, attending over ``context_length`` positions.

    For the encoder-decoder this is one input token through the encoder plus one target token through the
    decoder and the output projection, the unit in which the paper compares FLOP-matched models. Switch layers
    count their router and ``top_k`` experts, so a top-1 Switch model matches its dense twin up to the router.
    """
    d, inner, vocab = config.d_model, config.num_heads * config.head_dim, config.vocab_size
    ffn_dense = d * config.d_ff * config.activation.input_width_multiplier + config.d_ff * d
    attention_proj = 4 * d * inner
    attention_scores = 2 * context_length * inner  # q.k and attention-weighted values

    def stack(which: Stack) -> int:
        attention_blocks = 2 if which is Stack.DECODER and config.is_encoder_decoder else 1  # cross-attention
        layers, sparse = config.stack_layers(which), len(config.switch_layers(which))
        macs = layers * attention_blocks * (attention_proj + attention_scores) + (layers - sparse) * ffn_dense
        if sparse:
            assert config.moe is not None
            macs += sparse * (config.moe.top_k * ffn_dense + d * config.moe.num_experts)
        return macs

    return 2 * (sum(stack(which) for which in config.stacks) + d * vocab)


def model_size(config: ModelConfig, *, context_length: int = 512) -> ModelSize:
    total, active = count_parameters(config)
    return ModelSize(total, active, flops_per_token(config, context_length=context_length))

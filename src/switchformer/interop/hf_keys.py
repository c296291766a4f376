"""The one key map between our state dict and the Hugging Face ``transformers`` Switch Transformers port.

Every name appears once below. Layout differences: our experts are stacked (``ffn.experts.wi`` is
``[E, d_model, M*d_ff]``, ``ffn.experts.wo`` is ``[E, d_ff, d_model]``) where HF keeps one ``nn.Linear`` per
expert (``experts.expert_{j}.wi.weight`` is ``[d_ff, d_model]``), so each expert is transposed; gated FFNs use
T5.1.1's ``wi_0`` (gate) and ``wi_1`` (linear) names, fused in our ``wi`` as [gate half, linear half]. Our
relative position bias belongs to the stack, HF's to block 0's self-attention. The decoder FFN is HF's
``layer.2`` (``layer.1`` is cross-attention).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from switchformer.interop.key_map import CheckpointError, ParamMapping, Transform, to_external, to_ours
from switchformer.models.config import ModelConfig

# Tied copies of the embedding that HF checkpoints may carry besides ``shared.weight``.
_EMBEDDING_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _attention(ours: str, hf: str) -> list[ParamMapping]:
    return [ParamMapping(f"{ours}.{p}.weight", (f"{hf}.{p}.weight",)) for p in ("q", "k", "v", "o")]


def _ffn(config: ModelConfig, ours: str, hf: str, *, sparse: bool) -> list[ParamMapping]:
    """FFN weights of one block: a dense ``mlp`` or a Switch layer (router plus experts)."""
    gated = config.activation.is_gated
    if not sparse:
        wi = (
            ParamMapping(f"{ours}.wi.weight", (f"{hf}.wi_0.weight", f"{hf}.wi_1.weight"), Transform.CONCAT_ROWS)
            if gated
            else ParamMapping(f"{ours}.wi.weight", (f"{hf}.wi.weight",))
        )
        return [wi, ParamMapping(f"{ours}.wo.weight", (f"{hf}.wo.weight",))]
    assert config.moe is not None
    experts = range(config.moe.num_experts)
    mappings = [ParamMapping(f"{ours}.router.weight", (f"{hf}.router.classifier.weight",))]
    if config.moe.router_bias:
        mappings.append(ParamMapping(f"{ours}.router.bias", (f"{hf}.router.classifier.bias",)))
    if gated:
        names = tuple(f"{hf}.experts.expert_{j}.wi_{h}.weight" for j in experts for h in (0, 1))
        mappings.append(ParamMapping(f"{ours}.experts.wi", names, Transform.STACK_T_GATED))
    else:
        names = tuple(f"{hf}.experts.expert_{j}.wi.weight" for j in experts)
        mappings.append(ParamMapping(f"{ours}.experts.wi", names, Transform.STACK_T))
    names = tuple(f"{hf}.experts.expert_{j}.wo.weight" for j in experts)
    mappings.append(ParamMapping(f"{ours}.experts.wo", names, Transform.STACK_T))
    return mappings


def _stack(config: ModelConfig, name: str, num_layers: int) -> list[ParamMapping]:
    decoder = name == "decoder"
    ffn_layer = 2 if decoder else 1
    bias = f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    mappings = [ParamMapping(f"{name}.position_bias.embedding.weight", (bias,))]
    for i in range(num_layers):
        ours, hf = f"{name}.blocks.{i}", f"{name}.block.{i}.layer"
        mappings.append(ParamMapping(f"{ours}.self_attn_norm.weight", (f"{hf}.0.layer_norm.weight",)))
        mappings += _attention(f"{ours}.self_attn", f"{hf}.0.SelfAttention")
        if decoder:
            mappings.append(ParamMapping(f"{ours}.cross_attn_norm.weight", (f"{hf}.1.layer_norm.weight",)))
            mappings += _attention(f"{ours}.cross_attn", f"{hf}.1.EncDecAttention")
        mappings.append(ParamMapping(f"{ours}.ffn_norm.weight", (f"{hf}.{ffn_layer}.layer_norm.weight",)))
        mappings += _ffn(config, f"{ours}.ffn", f"{hf}.{ffn_layer}.mlp", sparse=config.is_sparse_layer(i))
    mappings.append(ParamMapping(f"{name}.final_norm.weight", (f"{name}.final_layer_norm.weight",)))
    return mappings


def hf_key_map(config: ModelConfig) -> list[ParamMapping]:
    """Every parameter of the encoder-decoder ``config`` describes, with its HF name(s) and transform."""
    if not config.is_encoder_decoder:
        raise ValueError("transformers' Switch Transformers port is encoder-decoder only; this model is decoder-only")
    mappings = [ParamMapping("shared.weight", ("shared.weight",))]
    if not config.tie_word_embeddings:
        mappings.append(ParamMapping("lm_head.weight", ("lm_head.weight",)))
    mappings += _stack(config, "encoder", config.num_layers)
    mappings += _stack(config, "decoder", config.decoder_layers)
    return mappings


def to_hf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names, tied weights stored once (as ``transformers`` saves them).

    Untied models also get ``encoder/decoder.embed_tokens.weight`` copies: transformers 5 ties those to
    ``shared`` only when ``tie_word_embeddings`` is true, and would otherwise initialise them at random.
    """
    out = to_external(state, hf_key_map(config), source="HF export")
    if not config.tie_word_embeddings:
        out |= {alias: out["shared.weight"].clone() for alias in _EMBEDDING_ALIASES}
    return out


def from_hf_state_dict(
    hf_state: Mapping[str, torch.Tensor], config: ModelConfig, *, source: str = "HF state dict"
) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict; ``source`` (e.g. the folder) names the checkpoint in errors.

    Tied duplicates (``encoder.embed_tokens``, ``decoder.embed_tokens``, and ``lm_head`` when tied) are accepted
    when they equal ``shared.weight``; a checkpoint that stores the embedding only under an alias still loads.
    """
    hf_state = dict(hf_state)
    if "shared.weight" not in hf_state:
        for alias in _EMBEDDING_ALIASES:
            if alias in hf_state:
                hf_state["shared.weight"] = hf_state[alias]
                break
    tied = [*_EMBEDDING_ALIASES, *(["lm_head.weight"] if config.tie_word_embeddings else [])]
    shared = hf_state.get("shared.weight")
    for alias in tied:
        if alias in hf_state and shared is not None and not torch.equal(hf_state[alias], shared):
            raise CheckpointError(
                f"{source}: {alias} differs from shared.weight, but switchformer shares one embedding between "
                "the encoder, the decoder" + (" and the output layer" if config.tie_word_embeddings else "")
            )
    return to_ours(hf_state, hf_key_map(config), config=config, source=source, ignorable=set(tied).__contains__)

"""The one key map between our state dict and the Hugging Face ``transformers`` Switch Transformers port.

Every name appears once below. Layout differences: our experts are stacked (``ffn.experts.wi`` is
``[E, d_model, M*d_ff]``, ``ffn.experts.wo`` is ``[E, d_ff, d_model]``) where HF keeps one ``nn.Linear`` per
expert (``experts.expert_{j}.wi.weight`` is ``[d_ff, d_model]``), so each expert is transposed; gated FFNs use
T5.1.1's ``wi_0`` (gate) and ``wi_1`` (linear) names, fused in our ``wi`` as [gate half, linear half]. Our
relative position bias belongs to the stack, HF's to block 0's self-attention. The decoder FFN is HF's
``layer.2`` (``layer.1`` is cross-attention).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping

import torch

from switchformer.interop.key_map import CheckpointError, ParamMapping, Transform, to_external, to_ours
from switchformer.models.config import InputEmbeddings, ModelConfig, Stack

logger = logging.getLogger(__name__)

# The stacks' own input embeddings: copies of ``shared.weight`` when tied, tables of their own in transformers 5
# when untied.
_EMBEDDING_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_DECODER_EMBEDDING = _EMBEDDING_ALIASES[1]


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


def _stack(config: ModelConfig, stack: Stack) -> list[ParamMapping]:
    name, decoder, sparse = stack.value, stack is Stack.DECODER, config.switch_layers(stack)
    ffn_layer = 2 if decoder else 1
    bias = f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    mappings = [ParamMapping(f"{name}.position_bias.embedding.weight", (bias,))]
    for i in range(config.stack_layers(stack)):
        ours, hf = f"{name}.blocks.{i}", f"{name}.block.{i}.layer"
        mappings.append(ParamMapping(f"{ours}.self_attn_norm.weight", (f"{hf}.0.layer_norm.weight",)))
        mappings += _attention(f"{ours}.self_attn", f"{hf}.0.SelfAttention")
        if decoder:
            mappings.append(ParamMapping(f"{ours}.cross_attn_norm.weight", (f"{hf}.1.layer_norm.weight",)))
            mappings += _attention(f"{ours}.cross_attn", f"{hf}.1.EncDecAttention")
        mappings.append(ParamMapping(f"{ours}.ffn_norm.weight", (f"{hf}.{ffn_layer}.layer_norm.weight",)))
        mappings += _ffn(config, f"{ours}.ffn", f"{hf}.{ffn_layer}.mlp", sparse=i in sparse)
    mappings.append(ParamMapping(f"{name}.final_norm.weight", (f"{name}.final_layer_norm.weight",)))
    return mappings


def hf_key_map(config: ModelConfig) -> list[ParamMapping]:
    """Every parameter of the encoder-decoder ``config`` describes, with its HF name(s) and transform.

    Our ``shared`` is the encoder's input embedding; with ``input_embeddings='per-stack'`` the decoder's is
    ``decoder_embed`` (HF ``decoder.embed_tokens``).
    """
    if not config.is_encoder_decoder:
        raise ValueError("transformers' Switch Transformers port is encoder-decoder only; this model is decoder-only")
    mappings = [ParamMapping("shared.weight", ("shared.weight",))]
    if config.input_embeddings is InputEmbeddings.PER_STACK:
        mappings.append(ParamMapping("decoder_embed.weight", (_DECODER_EMBEDDING,)))
    if not config.tie_word_embeddings:
        mappings.append(ParamMapping("lm_head.weight", ("lm_head.weight",)))
    mappings += _stack(config, Stack.ENCODER)
    mappings += _stack(config, Stack.DECODER)
    return mappings


def to_hf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names, tied weights stored once (as ``transformers`` saves them).

    Untied models also get ``encoder/decoder.embed_tokens.weight``, the tables transformers 5 reads its inputs
    from when ``tie_word_embeddings`` is false (it would otherwise initialise them at random); ``shared.weight``,
    which its forward then does not read, holds the encoder's table.
    """
    out = to_external(state, hf_key_map(config), source="HF export")
    if not config.tie_word_embeddings:
        out |= {alias: out["shared.weight"].clone() for alias in _EMBEDDING_ALIASES if alias not in out}
    return out


# Tensors that may hold the input embedding (and, tied, the output layer): compared, never loaded twice.
EMBEDDING_NAMES = ("shared.weight", *_EMBEDDING_ALIASES, "lm_head.weight")
# Whether two named tensors of a checkpoint hold the same values (a checkpoint read whole or one read in slices).
SameTensors = Callable[[str, str], bool]


def embeddings_differ(keys: Collection[str], same: SameTensors) -> bool:
    """Whether the checkpoint's encoder and decoder read their tokens from different tables (transformers 5,
    untied): such a checkpoint needs ``input_embeddings='per-stack'``."""
    shared = "shared.weight" if "shared.weight" in keys else None
    encoder, decoder = (alias if alias in keys else shared for alias in _EMBEDDING_ALIASES)
    return encoder is not None and decoder is not None and encoder != decoder and not same(encoder, decoder)


def hf_sources(
    keys: Collection[str], same: SameTensors, config: ModelConfig, *, source: str = "HF state dict"
) -> tuple[list[ParamMapping], Callable[[str], bool]]:
    """Where each of our parameters comes from in a HF checkpoint holding ``keys``, and which other tensors it may
    hold unused; ``source`` (e.g. the folder) names the checkpoint in errors.

    Tied checkpoints keep one table: their duplicates (``encoder.embed_tokens``, ``decoder.embed_tokens`` and
    ``lm_head``) must equal ``shared.weight``, and a checkpoint that stores it only under an alias still loads.
    Untied ones load the tables transformers' forward reads: ``encoder/decoder.embed_tokens`` (``shared.weight``
    standing in for an absent one, as transformers 4 files store it alone). Their ``shared.weight`` is then
    read by nothing and not kept.
    """
    gated_weights = any(key.endswith(".wi_0.weight") for key in keys)
    if gated_weights != config.activation.is_gated:
        raise CheckpointError(
            f"{source}: the weights hold {'gated (wi_0, wi_1)' if gated_weights else 'ungated (wi)'} FFNs but the "
            f"config's activation is {config.activation.value!r}; transformers' Switch port reads dense_act_fn "
            "(not feed_forward_proj), so config.json needs dense_act_fn "
            + ("'gated-gelu' or 'gated-silu'" if gated_weights else "'relu' or 'gelu'")
        )
    shared = next((name for name in ("shared.weight", *_EMBEDDING_ALIASES) if name in keys), None)
    decoder = None
    if config.tie_word_embeddings:
        why = "switchformer ties the encoder's, the decoder's and the output layer's weights to it"
        _require_equal(keys, same, [*_EMBEDDING_ALIASES, "lm_head.weight"], shared, source, why)
    else:
        encoder = _EMBEDDING_ALIASES[0] if _EMBEDDING_ALIASES[0] in keys else shared
        if shared is not None and encoder is not None and shared != encoder:
            logger.info("%s: shared.weight is not read: an untied model reads encoder.embed_tokens instead", source)
        shared = encoder
        if config.input_embeddings is InputEmbeddings.SHARED:
            why = "this config gives both stacks one table (from_pretrained chooses input_embeddings='per-stack')"
            _require_equal(keys, same, [_DECODER_EMBEDDING], shared, source, why)
        else:
            decoder = _DECODER_EMBEDDING if _DECODER_EMBEDDING in keys else shared
    renamed = {"shared.weight": shared, "decoder_embed.weight": decoder}
    mappings = [
        ParamMapping(m.ours, (renamed[m.ours],)) if renamed.get(m.ours) is not None else m for m in hf_key_map(config)
    ]
    needed = {key for m in mappings for key in m.external}
    ignorable = set(EMBEDDING_NAMES) - needed
    return mappings, ignorable.__contains__


def from_hf_state_dict(
    hf_state: Mapping[str, torch.Tensor], config: ModelConfig, *, source: str = "HF state dict"
) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict (see :func:`hf_sources` for the embeddings); ``source`` names the checkpoint
    in errors."""

    def same(a: str, b: str) -> bool:
        return torch.equal(hf_state[a], hf_state[b])

    mappings, ignorable = hf_sources(hf_state.keys(), same, config, source=source)
    return to_ours(hf_state, mappings, config=config, source=source, ignorable=ignorable)


def _require_equal(
    keys: Collection[str], same: SameTensors, copies: list[str], name: str | None, source: str, why: str
) -> None:
    """Each of ``copies`` present in the checkpoint must equal the tensor named ``name``."""
    for copy in copies:
        if copy in keys and name is not None and copy != name and not same(copy, name):
            raise CheckpointError(f"{source}: {copy} differs from {name}, but {why}")

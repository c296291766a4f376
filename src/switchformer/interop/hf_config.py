"""Map a ``transformers`` ``SwitchTransformersConfig`` (or its ``config.json`` dict) to our ``ModelConfig`` and back.

Loading gives Hugging Face's semantics exactly: a fixed capacity per sequence (``grouping='sequence'``,
``expert_capacity``), padding routed like any token unless the config says otherwise, the router bias if any.
Exporting writes the fields ``transformers`` reads plus our full config under ``switchformer_config``, so a
round trip through an HF folder restores options HF cannot express (capacity factors, grouping, init scale);
that copy is used only while the HF fields still agree with it (nobody edited the file in between).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from switchformer.config import ConfigError
from switchformer.layers.activation import Activation
from switchformer.models.config import ModelConfig, Stack, every_nth_layer
from switchformer.moe.config import Gate, Grouping, MoEConfig, OverflowPolicy, RoutingPriority

logger = logging.getLogger(__name__)

MODEL_TYPE = "switch_transformers"
EMBEDDED_KEY = "switchformer_config"  # our full ModelConfig inside an exported HF config.json

# transformers' defaults for fields a config.json may omit (SwitchTransformersConfig, transformers 4.x-5.x).
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 768,
    "d_kv": 64,
    "d_ff": 2048,
    "expert_capacity": 64,
    "num_layers": 12,
    "num_sparse_encoder_layers": 3,
    "num_decoder_layers": 12,
    "num_sparse_decoder_layers": 3,
    "num_heads": 12,
    "num_experts": 8,
    "router_bias": False,
    "router_jitter_noise": 0.01,
    "router_dtype": "float32",
    "router_ignore_padding_tokens": False,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "router_z_loss_coef": 0.001,
    "router_aux_loss_coef": 0.001,
    "dense_act_fn": "relu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": None,
    "tie_word_embeddings": True,
}

# ``dense_act_fn`` -> ours: the one field transformers' Switch port reads for the FFN (an ACT2FN key: relu, gelu).
# The gated values are the ones its config documents for T5.1.1-style experts (Switch-XXL); transformers itself
# cannot build them, switchformer loads their ``wi_0``/``wi_1`` weights. T5's ``feed_forward_proj`` is not read:
# the port ignores it, so a config.json carrying it runs the FFN ``dense_act_fn`` names.
_ACTIVATIONS = {
    "relu": Activation.RELU,
    "gelu": Activation.GELU,
    "gated-gelu": Activation.GATED_GELU,
    "gated-silu": Activation.GATED_SILU,
}


def hf_sparse_layers(num_layers: int, num_sparse: int) -> list[int]:
    """The layers ``transformers`` makes sparse, reproducing its rule exactly.

    ``step = num_layers // num_sparse`` and layer ``i`` is sparse when ``step == 1`` or ``i % step == 1``. Quirk:
    ``num_sparse=0`` sets ``step = num_layers``, which still makes layer 1 sparse; only ``num_sparse >
    num_layers`` (step 0) gives a dense stack.
    """
    step = num_layers // num_sparse if num_sparse > 0 else num_layers
    if step <= 0:
        return []
    return [i for i in range(num_layers) if step == 1 or i % step == 1]


def _num_sparse_for(num_layers: int, layers: tuple[int, ...]) -> int:
    """A ``num_sparse_*_layers`` value for which transformers builds exactly ``layers`` as sparse."""
    for candidate in [*range(1, num_layers + 1), num_layers + 1]:
        if tuple(hf_sparse_layers(num_layers, candidate)) == layers:
            return candidate
    raise ConfigError(
        f"sparse layers {list(layers)} of a {num_layers}-layer stack have no equivalent in transformers' placement "
        "(layer i is sparse when i % (num_layers // num_sparse) == 1, or every layer); choose another "
        "sparse_every or sparse_layers, or save with format='switchformer'"
    )


def _activation(data: Mapping[str, Any]) -> Activation:
    name = data.get("dense_act_fn", HF_DEFAULTS["dense_act_fn"])
    if name not in _ACTIVATIONS:
        raise ConfigError(
            f"HF config dense_act_fn={name!r} is not supported: switchformer implements {sorted(_ACTIVATIONS)}"
        )
    ignored = data.get("feed_forward_proj")
    if ignored is not None and ignored != name:
        logger.warning(
            "HF config feed_forward_proj=%r is ignored, as transformers' Switch port ignores it: the FFN follows "
            "dense_act_fn=%r",
            ignored,
            name,
        )
    return _ACTIVATIONS[name]


def _scalar_id(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key, HF_DEFAULTS[key])
    if isinstance(value, list):  # transformers allows several eos ids; generation here uses one
        if len(value) > 1:
            logger.warning("%s=%s: using the first id only", key, value)
        value = value[0] if value else None
    return value


def placement_fields(
    enc_layers: list[int], dec_layers: list[int], num_layers: int, num_decoder_layers: int
) -> dict[str, Any]:
    """The :class:`ModelConfig` fields placing Switch layers exactly at ``enc_layers`` and ``dec_layers``.

    One ``sparse_every`` when its rule gives both stacks' layers (the paper's every-other placement, the released
    checkpoints), else the explicit per-stack lists.
    """
    for every in range(1, max(num_layers, num_decoder_layers) + 2):
        if every_nth_layer(num_layers, every) == tuple(enc_layers) and every_nth_layer(
            num_decoder_layers, every
        ) == tuple(dec_layers):
            return {"sparse_every": every}
    return {"sparse_layers": tuple(enc_layers), "decoder_sparse_layers": tuple(dec_layers)}


def config_from_hf(hf_config: Any) -> ModelConfig:
    """Our config for a ``SwitchTransformersConfig`` or its ``config.json`` dict, with HF's routing semantics.

    A copy of our own config embedded by :func:`config_to_hf` is returned instead when the HF fields still agree
    with it. Raises :class:`ConfigError` for configs we cannot reproduce (unknown activations, another
    ``model_type``). Every placement of Switch layers transformers can build loads, stack by stack.
    """
    data = dict(hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict())
    derived = _derive(data)
    embedded = data.get(EMBEDDED_KEY)
    if embedded is None:
        return derived
    ours = ModelConfig.from_dict(embedded)
    if _derive(_hf_fields(ours, warn=False)) == derived:
        return ours
    logger.warning("HF fields disagree with the embedded %s (edited after export?); using them", EMBEDDED_KEY)
    return derived


def _derive(data: Mapping[str, Any]) -> ModelConfig:
    model_type = data.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise ConfigError(f"HF config model_type={model_type!r} is not supported: expected {MODEL_TYPE!r}")
    if data.get("is_encoder_decoder", True) is False:
        raise ConfigError("HF config is_encoder_decoder=False is not supported: Switch checkpoints are encoder-decoder")

    def get(key: str) -> Any:
        return data.get(key, HF_DEFAULTS[key])

    num_layers = get("num_layers")
    num_decoder_layers = get("num_decoder_layers") or num_layers
    enc_sparse = hf_sparse_layers(num_layers, get("num_sparse_encoder_layers"))
    dec_sparse = hf_sparse_layers(num_decoder_layers, get("num_sparse_decoder_layers"))
    moe, placement = None, {}
    if enc_sparse or dec_sparse:
        placement = placement_fields(enc_sparse, dec_sparse, num_layers, num_decoder_layers)
        if get("router_dtype") != "float32":
            logger.warning("router_dtype=%s: switchformer always routes in float32", get("router_dtype"))
        moe = MoEConfig(
            num_experts=get("num_experts"),
            top_k=1,
            expert_capacity=get("expert_capacity"),
            grouping=Grouping.SEQUENCE,
            router_jitter=float(get("router_jitter_noise")),
            router_bias=bool(get("router_bias")),
            ignore_padding_tokens=bool(get("router_ignore_padding_tokens")),
            load_balancing_loss_coef=float(get("router_aux_loss_coef")),
            z_loss_coef=float(get("router_z_loss_coef")),
        )
    pad = _scalar_id(data, "pad_token_id")
    pad = 0 if pad is None else pad
    eos = _scalar_id(data, "eos_token_id")
    start = _scalar_id(data, "decoder_start_token_id")
    return ModelConfig(
        vocab_size=get("vocab_size"),
        d_model=get("d_model"),
        d_ff=get("d_ff"),
        num_heads=get("num_heads"),
        d_kv=get("d_kv"),  # explicit, as in the presets of the released shapes
        num_layers=num_layers,
        num_decoder_layers=None if num_decoder_layers == num_layers else num_decoder_layers,
        activation=_activation(data),
        dropout=float(get("dropout_rate")),
        layer_norm_eps=float(get("layer_norm_epsilon")),
        relative_attention_num_buckets=get("relative_attention_num_buckets"),
        relative_attention_max_distance=get("relative_attention_max_distance"),
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        moe=moe,
        pad_token_id=pad,
        eos_token_id=1 if eos is None else eos,
        decoder_start_token_id=pad if start is None else start,  # T5 starts decoding from the pad token
        **placement,
    )


def _hf_capacity(moe: MoEConfig, *, warn: bool) -> int:
    """HF's fixed per-sequence capacity for our routing; semantics HF cannot express are logged, not hidden."""
    if moe.expert_capacity is not None:
        if warn and moe.grouping is not Grouping.SEQUENCE:
            logger.warning("HF applies expert_capacity=%d per sequence, not per %s", moe.expert_capacity, moe.grouping)
        return moe.expert_capacity
    if moe.dropless:
        return 2**31 - 1  # HF compares positions with the capacity: a huge capacity drops nothing
    if warn:
        logger.warning(
            "transformers uses a fixed capacity per sequence; capacity_factor=%s over %s groups cannot be "
            "expressed, writing its default expert_capacity=64",
            moe.eval_capacity_factor,
            moe.grouping.value,
        )
    return HF_DEFAULTS["expert_capacity"]


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A ``config.json`` dict for ``SwitchTransformersForConditionalGeneration``, embedding our full config.

    Raises :class:`ConfigError` for models transformers cannot run: decoder-only, gated or top-k > 1 FFNs,
    or a placement of Switch layers its rule cannot produce.
    """
    return _hf_fields(config, warn=True) | {EMBEDDED_KEY: config.to_dict()}


def _hf_fields(config: ModelConfig, *, warn: bool) -> dict[str, Any]:
    if not config.is_encoder_decoder:
        raise ConfigError("transformers' Switch port is encoder-decoder only; save decoder-only models as switchformer")
    if config.activation not in (Activation.RELU, Activation.GELU):
        raise ConfigError(
            f"ModelConfig.activation={config.activation.value!r}: transformers' Switch port has no gated FFN "
            "(only dense_act_fn relu/gelu); save this model with format='switchformer'"
        )
    num_layers, num_decoder_layers = config.num_layers, config.decoder_layers
    enc, dec = config.switch_layers(Stack.ENCODER), config.switch_layers(Stack.DECODER)
    out: dict[str, Any] = {
        "model_type": MODEL_TYPE,
        "architectures": ["SwitchTransformersForConditionalGeneration"],
        "is_encoder_decoder": True,
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.head_dim,
        "d_ff": config.d_ff,
        "num_heads": config.num_heads,
        "num_layers": num_layers,
        "num_decoder_layers": num_decoder_layers,
        "num_sparse_encoder_layers": _num_sparse_for(num_layers, enc),
        "num_sparse_decoder_layers": _num_sparse_for(num_decoder_layers, dec),
        "dense_act_fn": config.activation.value,
        "dropout_rate": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "tie_word_embeddings": config.tie_word_embeddings,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
        "decoder_start_token_id": config.decoder_start_token_id,
        "router_dtype": "float32",
    }
    moe = config.moe
    if moe is not None:
        if moe.top_k != 1:
            raise ConfigError(f"MoEConfig.top_k={moe.top_k}: transformers' Switch port routes top-1 only")
        if moe.gate is not Gate.PROBABILITY:
            raise ConfigError(
                f"MoEConfig.gate={moe.gate.value!r}: transformers' Switch port weights experts by the router "
                "probability; save this model as switchformer"
            )
        if warn and (moe.overflow is not OverflowPolicy.DROP or moe.priority is not RoutingPriority.POSITION):
            logger.warning("transformers drops overflowing tokens in position order; overflow/priority are lost")
        out |= {
            "num_experts": moe.num_experts,
            "expert_capacity": _hf_capacity(moe, warn=warn),
            "router_bias": moe.router_bias,
            "router_jitter_noise": moe.router_jitter,
            "router_ignore_padding_tokens": moe.ignore_padding_tokens,
            "router_aux_loss_coef": moe.load_balancing_loss_coef,
            "router_z_loss_coef": moe.z_loss_coef,
        }
    return out

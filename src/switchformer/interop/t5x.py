"""The T5X / flaxformer parameter names of the original Switch checkpoints, given as arrays.

T5X checkpoints need JAX and TensorStore to open; once their ``target`` tree is available as a flat mapping of
names to arrays (e.g. saved with ``numpy.savez``), :func:`from_t5x` builds our model from it. Names are
``/``-separated (``.`` also accepted), optionally under ``target/``; optimizer state (``state/...``) is ignored.

flaxformer conventions this map encodes: dense kernels are ``[in, out]`` (torch ``Linear`` weights are
``[out, in]``); experts are already stacked, ``mlp/expert/wi/kernel`` ``[E, d_model, d_ff]`` as ours; the
relative position bias is ``[heads, buckets]``; gated FFNs have ``wi_0`` (gate) and ``wi_1`` (linear); untied
logits are ``decoder/logits_dense``. Attention kernels stored with a separate heads axis are flattened.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from switchformer.config import ConfigError
from switchformer.interop.checkpoint_io import model_from_state_dict
from switchformer.interop.hf_config import placement_fields
from switchformer.interop.key_map import CheckpointError, ParamMapping, Transform, to_external, to_ours
from switchformer.layers.activation import Activation
from switchformer.models.base import SwitchModelBase
from switchformer.models.config import InputEmbeddings, ModelConfig, Stack
from switchformer.moe.config import MoEConfig

logger = logging.getLogger(__name__)

_ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}


def _attention(ours: str, t5x: str) -> list[ParamMapping]:
    return [
        ParamMapping(f"{ours}.{p}.weight", (f"{t5x}/{n}/kernel",), Transform.TRANSPOSE) for p, n in _ATTENTION.items()
    ]


def _ffn(config: ModelConfig, ours: str, mlp: str, *, sparse: bool) -> list[ParamMapping]:
    gated = config.activation.is_gated
    if not sparse:
        if gated:
            wi = ParamMapping(
                f"{ours}.wi.weight", (f"{mlp}/wi_0/kernel", f"{mlp}/wi_1/kernel"), Transform.CONCAT_KERNELS
            )
        else:
            wi = ParamMapping(f"{ours}.wi.weight", (f"{mlp}/wi/kernel",), Transform.TRANSPOSE)
        return [wi, ParamMapping(f"{ours}.wo.weight", (f"{mlp}/wo/kernel",), Transform.TRANSPOSE)]
    assert config.moe is not None
    router = f"{mlp}/router/router_weights/w"
    mappings = [ParamMapping(f"{ours}.router.weight", (f"{router}/kernel",), Transform.TRANSPOSE)]
    if config.moe.router_bias:
        mappings.append(ParamMapping(f"{ours}.router.bias", (f"{router}/bias",)))
    if gated:
        names = (f"{mlp}/expert/wi_0/kernel", f"{mlp}/expert/wi_1/kernel")
        mappings.append(ParamMapping(f"{ours}.experts.wi", names, Transform.CONCAT_LAST))
    else:
        mappings.append(ParamMapping(f"{ours}.experts.wi", (f"{mlp}/expert/wi/kernel",)))
    mappings.append(ParamMapping(f"{ours}.experts.wo", (f"{mlp}/expert/wo/kernel",)))
    return mappings


def _stack(config: ModelConfig, stack: Stack) -> list[ParamMapping]:
    name, decoder, sparse = stack.value, stack is Stack.DECODER, config.switch_layers(stack)
    bias = ParamMapping(f"{name}.position_bias.embedding.weight", (f"{name}/relpos_bias/rel_embedding",))
    mappings = [ParamMapping(bias.ours, bias.external, Transform.TRANSPOSE)]
    for i in range(config.stack_layers(stack)):
        ours, t5x = f"{name}.blocks.{i}", f"{name}/layers_{i}"
        if decoder:
            mappings.append(
                ParamMapping(f"{ours}.self_attn_norm.weight", (f"{t5x}/pre_self_attention_layer_norm/scale",))
            )
            mappings += _attention(f"{ours}.self_attn", f"{t5x}/self_attention")
            mappings.append(
                ParamMapping(f"{ours}.cross_attn_norm.weight", (f"{t5x}/pre_cross_attention_layer_norm/scale",))
            )
            mappings += _attention(f"{ours}.cross_attn", f"{t5x}/encoder_decoder_attention")
        else:
            mappings.append(ParamMapping(f"{ours}.self_attn_norm.weight", (f"{t5x}/pre_attention_layer_norm/scale",)))
            mappings += _attention(f"{ours}.self_attn", f"{t5x}/attention")
        mappings.append(ParamMapping(f"{ours}.ffn_norm.weight", (f"{t5x}/pre_mlp_layer_norm/scale",)))
        mappings += _ffn(config, f"{ours}.ffn", f"{t5x}/mlp", sparse=i in sparse)
    norm = "decoder_norm" if decoder else "encoder_norm"
    mappings.append(ParamMapping(f"{name}.final_norm.weight", (f"{name}/{norm}/scale",)))
    return mappings


def t5x_key_map(config: ModelConfig) -> list[ParamMapping]:
    """Every parameter of the encoder-decoder ``config`` describes, with its T5X name(s) and transform."""
    if not config.is_encoder_decoder:
        raise ConfigError("T5X Switch checkpoints are encoder-decoder; this config is decoder-only")
    if config.input_embeddings is InputEmbeddings.PER_STACK:
        raise ConfigError("T5X checkpoints have one token embedder; input_embeddings='per-stack' has two")
    mappings = [ParamMapping("shared.weight", ("token_embedder/embedding",))]
    if not config.tie_word_embeddings:
        mappings.append(ParamMapping("lm_head.weight", ("decoder/logits_dense/kernel",), Transform.TRANSPOSE))
    return mappings + _stack(config, Stack.ENCODER) + _stack(config, Stack.DECODER)


def _to_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype.name == "bfloat16" or array.dtype.kind not in "fiub":  # ml_dtypes bfloat16 has no torch twin
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))


def normalize_t5x_params(params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Flat, ``/``-separated names without ``target/``, optimizer state dropped, attention heads axes flattened."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, child in value.items():
                visit(f"{prefix}/{key}" if prefix else str(key), child)
        else:
            flat[prefix.replace(".", "/")] = value

    visit("", params)
    out: dict[str, torch.Tensor] = {}
    for name, value in flat.items():
        if name.startswith("state/"):
            continue
        name = name.removeprefix("target/")
        tensor = _to_tensor(value)
        if tensor.dim() == 3 and re.search(r"attention/(query|key|value)/kernel$", name):
            tensor = tensor.reshape(tensor.shape[0], -1)  # [D, H, K] -> [D, H*K]
        elif tensor.dim() == 3 and re.search(r"attention/out/kernel$", name):
            tensor = tensor.reshape(-1, tensor.shape[-1])  # [H, K, D] -> [H*K, D]
        out[name] = tensor
    return out


def _layers(params: Mapping[str, torch.Tensor], stack: str) -> list[int]:
    found = {int(m.group(1)) for key in params if (m := re.match(rf"{stack}/layers_(\d+)/", key))}
    return sorted(found)


def t5x_config(params: Mapping[str, Any], **changes: Any) -> ModelConfig:
    """Infer the architecture from the arrays' names and shapes; ``changes`` set what shapes cannot tell.

    Shapes cannot tell ReLU from GELU (ReLU is assumed, as in Switch-Base/Large; gated GELU when ``wi_0`` is
    present), nor the routing options (the paper's defaults are used) or ``relative_attention_max_distance``.
    """
    p = normalize_t5x_params(params)
    try:
        vocab, d_model = p["token_embedder/embedding"].shape
        heads, buckets = p["encoder/relpos_bias/rel_embedding"].shape
        inner = p["encoder/layers_0/attention/query/kernel"].shape[1]
    except KeyError as error:
        raise CheckpointError(f"T5X params: missing {error.args[0]!r}; is this a T5X encoder-decoder?") from None
    enc, dec = _layers(p, "encoder"), _layers(p, "decoder")
    sparse = [i for i in enc if f"encoder/layers_{i}/mlp/router/router_weights/w/kernel" in p]
    sparse_dec = [i for i in dec if f"decoder/layers_{i}/mlp/router/router_weights/w/kernel" in p]
    gated = any(key.endswith("wi_0/kernel") for key in p)
    wi = next(p[key] for key in p if re.search(r"/mlp/(expert/)?wi(_0)?/kernel$", key))
    moe, placement = None, {}
    if sparse or sparse_dec:
        placement = placement_fields(sparse, sparse_dec, len(enc), len(dec))
        first = sparse[0] if sparse else sparse_dec[0]
        stack = "encoder" if sparse else "decoder"
        num_experts = p[f"{stack}/layers_{first}/mlp/router/router_weights/w/kernel"].shape[1]
        bias = f"{stack}/layers_{first}/mlp/router/router_weights/w/bias" in p
        moe = MoEConfig(num_experts=num_experts, router_bias=bias)
    fields: dict[str, Any] = {
        "vocab_size": vocab,
        "d_model": d_model,
        "d_ff": wi.shape[-1],
        "num_heads": heads,
        "d_kv": None if inner == d_model else inner // heads,
        "num_layers": len(enc),
        "num_decoder_layers": None if len(dec) == len(enc) else len(dec),
        "activation": Activation.GATED_GELU if gated else Activation.RELU,
        "relative_attention_num_buckets": buckets,
        "tie_word_embeddings": "decoder/logits_dense/kernel" not in p,
        "moe": moe,
        "init_scale": 0.1 if moe is not None else 1.0,
    }
    return ModelConfig(**(fields | placement | changes))


def from_t5x(
    params: Mapping[str, Any], *, config: ModelConfig | None = None, dtype: torch.dtype | None = torch.float32
) -> SwitchModelBase:
    """Our model from T5X arrays; ``config`` defaults to :func:`t5x_config` inferred from the arrays."""
    tensors = normalize_t5x_params(params)
    config = config if config is not None else t5x_config(tensors)
    state = to_ours(tensors, t5x_key_map(config), config=config, source="T5X params")
    return model_from_state_dict(config, state, dtype=dtype)


def to_t5x(model: SwitchModelBase) -> dict[str, np.ndarray]:
    """The inverse map: our model as flat T5X-named float32 arrays (``target/`` omitted)."""
    state = {key: tensor.detach().float().cpu() for key, tensor in model.state_dict().items()}
    tensors = to_external(state, t5x_key_map(model.config), source="T5X export")
    return {key: tensor.numpy() for key, tensor in tensors.items()}

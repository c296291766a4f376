"""Named model configurations: the paper's released shapes, their dense twins, and CPU-sized ones.

Shapes of the released models come from the T5X gin files and the Hugging Face configs (table in
docs/model.md). Each Switch preset's FLOP-matched dense baseline is the same shape with ``moe=None``
(``get_preset("switch-base-128").dense()`` equals ``get_preset("t5-base")`` up to the init scale).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from switchformer.config import ConfigError
from switchformer.layers.activation import Activation
from switchformer.models.config import Architecture, ModelConfig
from switchformer.moe.config import MoEConfig

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register_preset(name: str) -> Callable[[Callable[[], ModelConfig]], Callable[[], ModelConfig]]:
    def wrap(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        _PRESETS[name] = fn
        return fn

    return wrap


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the named config; unknown names list the known ones."""
    if name not in _PRESETS:
        raise ConfigError(f"preset={name!r} is invalid: must be one of {', '.join(preset_names())}")
    return _PRESETS[name]()


def switch_moe(num_experts: int, **changes: Any) -> MoEConfig:
    """The paper's Switch routing: top-1, capacity factor 1.25 (train) / 2.0 (eval), jitter 1e-2, alpha 1e-2."""
    return MoEConfig(num_experts=num_experts, **changes)


def _sparse(dense: ModelConfig, moe: MoEConfig, **changes: Any) -> ModelConfig:
    """Switch version of a dense shape: MoE config and the paper's 0.1 initialisation scale."""
    return dense.replace(moe=moe, init_scale=0.1, **changes)


# -- the paper's shapes -------------------------------------------------------------------------------
def t5_base() -> ModelConfig:
    return ModelConfig(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64)


def t5_large() -> ModelConfig:
    return ModelConfig(d_model=1024, d_ff=4096, num_layers=24, num_heads=16, d_kv=64)


def t5_xxl() -> ModelConfig:
    """T5.1.1-XXL: gated GELU and untied logits, the dense shape of Switch-XXL."""
    return ModelConfig(
        d_model=4096,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        d_kv=64,
        activation=Activation.GATED_GELU,
        tie_word_embeddings=False,
    )


def switch_c_dense() -> ModelConfig:
    return ModelConfig(d_model=2080, d_ff=6144, num_layers=15, num_heads=30, d_kv=64, tie_word_embeddings=False)


def tiny(architecture: Architecture = Architecture.ENCODER_DECODER) -> ModelConfig:
    """CPU-sized: trains in minutes on a CPU. No dropout: short pre-training runs learn faster without it."""
    return ModelConfig(
        architecture=architecture, d_model=256, d_ff=1024, num_layers=4, num_heads=4, vocab_size=8192, dropout=0.0
    )


def _register_all() -> None:
    register_preset("t5-base")(t5_base)
    register_preset("t5-large")(t5_large)
    register_preset("t5-xxl")(t5_xxl)
    for n in (8, 16, 32, 64, 128, 256):
        register_preset(f"switch-base-{n}")(lambda n=n: _sparse(t5_base(), switch_moe(n)))
    register_preset("switch-large-128")(lambda: _sparse(t5_large(), switch_moe(128)))
    register_preset("switch-xxl-128")(lambda: _sparse(t5_xxl(), switch_moe(128)))
    register_preset("switch-c-2048")(lambda: _sparse(switch_c_dense(), switch_moe(2048), sparse_every=1))

    decoder_only = Architecture.DECODER_ONLY
    register_preset("t5-tiny")(tiny)
    register_preset("lm-tiny")(lambda: tiny(decoder_only))
    for n in (8, 16, 32):
        register_preset(f"switch-tiny-{n}")(lambda n=n: _sparse(tiny(), switch_moe(n)))
        register_preset(f"switch-lm-tiny-{n}")(lambda n=n: _sparse(tiny(decoder_only), switch_moe(n)))
    # The paper's top-2 "MoE" baseline; capacity doubled so the factor covers both choices as it does for top-1.
    top2 = switch_moe(8, top_k=2, capacity_factor=2.5, eval_capacity_factor=4.0)
    register_preset("moe-tiny-8-top2")(lambda: _sparse(tiny(), top2))
    register_preset("moe-lm-tiny-8-top2")(lambda: _sparse(tiny(decoder_only), top2))


_register_all()

from __future__ import annotations

import pytest

from switchformer import ModelConfig, MoEConfig


def small_config(architecture: str = "encoder-decoder", *, sparse: bool = True, **changes) -> ModelConfig:
    moe = MoEConfig(num_experts=4, dropless=True, router_jitter=0.0) if sparse else None
    base = ModelConfig(
        architecture=architecture, vocab_size=97, d_model=32, d_ff=48, num_heads=4, num_layers=2,
        num_decoder_layers=3, dropout=0.0, moe=moe, init_scale=0.1,
    )  # fmt: skip
    return base.replace(**changes)


@pytest.fixture
def make_config():
    return small_config

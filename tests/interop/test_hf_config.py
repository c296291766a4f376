"""The config map: HF's sparse-layer placement (quirks included), round trips, unsupported configs."""

from __future__ import annotations

import logging

import pytest
import torch

from switchformer import ConfigError, ModelConfig, MoEConfig, get_preset
from switchformer.interop.hf_config import EMBEDDED_KEY, config_from_hf, config_to_hf, hf_sparse_layers
from tests.interop.hf_models import BASE, transformers


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4])
@pytest.mark.parametrize("num_sparse", [0, 1, 2, 5])
def test_sparse_placement_reproduces_transformers(num_layers, num_sparse):
    config = transformers.SwitchTransformersConfig(
        **BASE | {"num_layers": num_layers, "num_sparse_encoder_layers": num_sparse}
    )
    with torch.device("meta"):
        model = transformers.SwitchTransformersEncoderModel(config)
    built = [i for i, block in enumerate(model.encoder.block) if block.is_sparse]
    assert hf_sparse_layers(num_layers, num_sparse) == built


def test_zero_sparse_layers_still_makes_layer_one_sparse_in_transformers():
    assert hf_sparse_layers(12, 0) == [1]  # the quirk the docstring of interop documents
    assert hf_sparse_layers(12, 13) == []


def _hf_semantics(**changes) -> ModelConfig:
    moe = MoEConfig(
        num_experts=8, grouping="sequence", expert_capacity=16, ignore_padding_tokens=False, z_loss_coef=1e-3
    )
    base = ModelConfig(vocab_size=128, d_model=48, d_ff=96, num_heads=4, d_kv=16, num_layers=4, num_decoder_layers=2)
    return base.replace(**({"moe": moe} | changes))


@pytest.mark.parametrize(
    "config",
    [
        _hf_semantics(),
        _hf_semantics(sparse_every=1, tie_word_embeddings=False, activation="gelu"),
        _hf_semantics(moe=None),
    ],
    ids=["every-other", "every-layer-untied-gelu", "dense"],
)
def test_hf_fields_alone_round_trip_hf_expressible_configs(config):
    data = config_to_hf(config)
    assert config_from_hf(data) == config
    del data[EMBEDDED_KEY]
    assert config_from_hf(data) == config
    assert config_from_hf(transformers.SwitchTransformersConfig(**data)) == config


def test_embedded_config_restores_what_hf_cannot_express_unless_edited(caplog):
    config = _hf_semantics(moe=MoEConfig(num_experts=8, capacity_factor=1.0, group_size=64), init_scale=0.1)
    data = config_to_hf(config)
    assert data["expert_capacity"] == 64  # HF's default, logged as a lossy export
    assert config_from_hf(data) == config
    with caplog.at_level(logging.WARNING):
        edited = config_from_hf(data | {"d_ff": 64})
    assert edited.d_ff == 64 and edited.moe.grouping.value == "sequence"
    assert "disagree" in caplog.text


def test_config_json_details():
    data = dict(BASE, eos_token_id=[1, 5], decoder_start_token_id=None, pad_token_id=3)
    config = config_from_hf(data)
    assert (config.eos_token_id, config.decoder_start_token_id, config.pad_token_id) == (1, 3, 3)
    assert config.d_kv == 8 and config.moe.router_jitter == 0.01 and config.moe.load_balancing_loss_coef == 1e-3
    assert config_from_hf(dict(BASE, dense_act_fn="gated-gelu")).activation.value == "gated-gelu"
    with pytest.raises(ConfigError, match="'gelu_new' is not supported"):
        config_from_hf(dict(BASE, dense_act_fn="gelu_new"))
    with pytest.raises(ConfigError, match="model_type='t5'"):
        config_from_hf(dict(BASE, model_type="t5"))


def test_released_switch_base_shape_maps_to_our_preset():
    """The shape fields of google/switch-base-8's config.json give the switch-base-8 preset's architecture."""
    hub = {
        "model_type": "switch_transformers", "d_model": 768, "d_ff": 3072, "d_kv": 64, "num_heads": 12,
        "num_layers": 12, "num_decoder_layers": 12, "num_sparse_encoder_layers": 6, "num_sparse_decoder_layers": 6,
        "num_experts": 8, "expert_capacity": 64, "vocab_size": 32128, "dense_act_fn": "relu",
    }  # fmt: skip
    config, preset = config_from_hf(hub), get_preset("switch-base-8")
    fields = ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "decoder_layers", "sparse_every", "vocab_size")
    assert [getattr(config, f) for f in fields] == [getattr(preset, f) for f in fields]
    assert config.moe.num_experts == preset.moe.num_experts == 8


@pytest.mark.parametrize("value", ["gated-gelu", "gated-silu", "gelu", "relu"])
def test_feed_forward_proj_is_ignored_as_transformers_ignores_it(value, caplog):
    """transformers' Switch port builds its FFNs from dense_act_fn alone; T5's feed_forward_proj changes nothing."""
    with caplog.at_level(logging.WARNING):
        config = config_from_hf(dict(BASE, feed_forward_proj=value))
    assert config == config_from_hf(BASE) and config.activation.value == "relu"
    assert ("feed_forward_proj" in caplog.text) == (value != "relu")
    hf = transformers.SwitchTransformersConfig(**BASE, feed_forward_proj=value)
    with torch.device("meta"):
        model = transformers.SwitchTransformersForConditionalGeneration(hf)
    assert type(model.encoder.block[0].layer[1].mlp.act).__name__ == "ReLU"  # what transformers runs

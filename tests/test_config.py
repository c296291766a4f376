"""Configs: validation errors name field, value and what is allowed; JSON round trip; generic overrides."""

from __future__ import annotations

import pytest

from switchformer import ConfigError, ModelConfig, MoEConfig, SwitchFFN, get_preset, preset_names


@pytest.mark.parametrize(
    ("build", "field", "value", "allowed"),
    [
        (lambda: MoEConfig(capacity_factor=0.0), "capacity_factor", "0.0", "must be > 0"),
        (lambda: MoEConfig(capacity_factor=-1.0), "capacity_factor", "-1.0", "must be > 0"),
        (lambda: MoEConfig(eval_capacity_factor=0), "eval_capacity_factor", "0", "must be > 0"),
        (lambda: MoEConfig(num_experts=0), "num_experts", "0", ">= 1"),
        (lambda: MoEConfig(num_experts=2, top_k=3), "top_k", "3", "between 1 and num_experts=2"),
        (lambda: MoEConfig(router_jitter=1.5), "router_jitter", "1.5", "[0, 1)"),
        (lambda: MoEConfig(top_k=2, overflow="next-best"), "overflow", "OverflowPolicy.NEXT_BEST", "top_k=1"),
        (lambda: ModelConfig(d_model=100, num_heads=3), "num_heads", "3", "divisible by num_heads"),
        (lambda: ModelConfig(activation="swish"), "activation", "'swish'", "'relu', 'gelu', 'gated-gelu'"),
        (lambda: ModelConfig(dropout=1.0), "dropout", "1.0", "[0, 1)"),
        (lambda: ModelConfig(sparse_every=0), "sparse_every", "0", ">= 1"),
        (lambda: get_preset("switch-nano-3"), "preset", "'switch-nano-3'", "switch-base-8"),
    ],
)
def test_bad_configs_raise_value_error_naming_field_value_and_allowed(build, field, value, allowed):
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert f"{field}=" in message and value in message and allowed in message, message


def test_switch_ffn_rejects_unknown_keyword():
    with pytest.raises(TypeError, match="capacity_fctor"):
        SwitchFFN(d_model=8, d_ff=8, capacity_fctor=1.0)


def test_switch_ffn_kwargs_reach_the_configs():
    layer = SwitchFFN(d_model=8, d_ff=12, num_experts=3, top_k=2, capacity_factor=1.5, eval_capacity_factor=3.0)
    assert (layer.config.d_model, layer.config.d_ff) == (8, 12)
    moe = layer.config.moe
    assert (moe.num_experts, moe.top_k, moe.capacity_factor, moe.eval_capacity_factor) == (3, 2, 1.5, 3.0)
    assert layer.experts.wi.shape == (3, 8, 12) and layer.experts.wo.shape == (3, 12, 8)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_round_trips_through_json(name):
    config = get_preset(name)
    assert ModelConfig.from_json(config.to_json()) == config


def test_overrides_parse_against_field_types():
    config = get_preset("switch-tiny-8").with_overrides(
        ["moe.capacity_factor=1.0", "moe.priority=confidence", "dropout=0.2", "tie_word_embeddings=false"]
    )
    assert config.moe.capacity_factor == 1.0 and config.moe.priority.value == "confidence"
    assert config.dropout == 0.2 and config.tie_word_embeddings is False
    assert get_preset("switch-tiny-8").with_overrides(["moe=null"]).moe is None
    enabled = get_preset("t5-tiny").with_overrides(["moe.num_experts=4"])
    assert enabled.moe is not None and enabled.moe.num_experts == 4


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("moe.capacity_factor=abc", "cannot parse"),
        ("moe.capcity_factor=1", "no field 'capcity_factor'"),
        ("d_model.x=1", "not a nested config"),
        ("dropout", "field=value"),
        ("moe.capacity_factor=0", "capacity_factor=0.0 is invalid"),
        ("moe=0", "a nested config takes a JSON object"),  # found by the slow property test: was a TypeError
        ("moe=[1, 2]", "a nested config takes a JSON object"),
    ],
)
def test_bad_overrides_are_clear(override, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        get_preset("switch-tiny-8").with_overrides([override])


def test_a_field_of_a_nested_config_set_after_a_bad_nested_value_is_a_clear_error():
    with pytest.raises(ConfigError, match="nested config takes a JSON object"):
        get_preset("switch-tiny-8").with_overrides(["moe=0", "moe.router_jitter=0"])
    config = get_preset("t5-tiny").with_overrides(['moe={"num_experts": 4}', "moe.router_jitter=0"])
    assert config.moe is not None and config.moe.num_experts == 4 and config.moe.router_jitter == 0.0


def test_from_dict_rejects_unknown_keys():
    data = get_preset("t5-tiny").to_dict()
    data["d_modle"] = 3
    with pytest.raises(ConfigError, match="d_modle"):
        ModelConfig.from_dict(data)

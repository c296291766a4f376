"""Parameter and FLOP counts against the paper's published sizes."""

from __future__ import annotations

import pytest

from switchformer import get_preset, model_size
from switchformer.models.flops import count_parameters, flops_per_token

PAPER_PARAMS = {
    "t5-base": 223e6,
    "t5-large": 739e6,
    "switch-base-128": 7.4e9,
    "switch-large-128": 26.3e9,
    "switch-xxl-128": 395e9,
    "switch-c-2048": 1571e9,
}


@pytest.mark.parametrize(("name", "expected"), sorted(PAPER_PARAMS.items()))
def test_parameter_counts_match_the_paper_within_two_percent(name, expected):
    total, _ = count_parameters(get_preset(name))
    assert abs(total - expected) / expected < 0.02, f"{name}: {total:,} vs paper {expected:,.0f}"


def test_active_parameters_of_switch_base_equal_t5_base_plus_routers():
    total_dense, active_dense = count_parameters(get_preset("t5-base"))
    _, active_sparse = count_parameters(get_preset("switch-base-128"))
    assert total_dense == active_dense
    routers = 12 * 128 * 768  # 6 encoder + 6 decoder Switch layers
    assert active_sparse == active_dense + routers


def test_switch_is_flop_matched_to_its_dense_twin_up_to_the_router():
    sparse, dense = get_preset("switch-base-128"), get_preset("t5-base")
    diff = flops_per_token(sparse) - flops_per_token(dense)
    assert diff == 2 * 12 * 768 * 128
    top2 = get_preset("moe-tiny-8-top2")
    assert flops_per_token(top2) > flops_per_token(get_preset("switch-tiny-8"))


def test_flops_by_hand_for_a_small_dense_decoder():
    config = get_preset("lm-tiny").replace(num_layers=1, vocab_size=10)
    d, f, ctx = 256, 1024, 512
    per_layer = 4 * d * d + 2 * ctx * d + 2 * d * f
    assert flops_per_token(config, context_length=ctx) == 2 * (per_layer + d * 10)


def test_model_size_builds_nothing_real():
    size = model_size(get_preset("switch-c-2048"))  # 1.6T parameters: only possible on the meta device
    assert size.params_total > 1.5e12 and size.params_active < 2e9

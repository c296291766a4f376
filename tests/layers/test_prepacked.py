"""Packed weights multiply as ``F.linear`` does (to float32 rounding), are made once, and follow in-place changes."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from switchformer.layers.prepacked import PrepackedLinear, PrepackedWeights, prepack_applies


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Float32 sums of 48-64 terms in another order: a few ulps of the largest term."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    scale = float(expected.detach().abs().amax()) if expected.numel() else 0.0
    torch.testing.assert_close(got.detach(), expected.detach(), atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("shape", [(4, 64), (3, 5, 64), (1, 64), (0, 64)], ids=["rows", "3-d", "one-row", "empty"])
def test_linear_equals_f_linear(shape):
    torch.manual_seed(0)
    weight, x = torch.randn(48, 64), torch.randn(shape)
    _close(PrepackedWeights().linear(x, weight), F.linear(x, weight))


def test_expert_product_equals_the_experts_own_matmul():
    torch.manual_seed(0)
    stacked, x = torch.randn(3, 64, 48), torch.randn(5, 64)  # [E, in, out] as GroupedExperts stores them
    weights = PrepackedWeights()
    for expert in range(3):
        _close(weights.expert_product(x, stacked, expert), x @ stacked[expert])


def test_a_weight_is_packed_once_and_again_after_an_in_place_change():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)
    weights, x = PrepackedWeights(), torch.randn(4, 64)
    weights.linear(x, linear.weight)
    packed = weights._packed(linear.weight, 0, linear.weight)
    weights.linear(x, linear.weight)
    assert weights._packed(linear.weight, 0, linear.weight) is packed
    assert weights.nbytes == 48 * 64 * 4
    with torch.no_grad():
        linear.weight.mul_(-2.0)  # what an optimizer step does: the version counter moves
    _close(weights.linear(x, linear.weight), F.linear(x, linear.weight))
    assert weights._packed(linear.weight, 0, linear.weight) is not packed


def test_prune_drops_copies_of_weights_that_are_gone_and_clear_drops_all():
    weights, x = PrepackedWeights(), torch.randn(2, 64)
    kept, gone = torch.randn(48, 64), torch.randn(48, 64)
    weights.linear(x, kept), weights.linear(x, gone)
    del gone
    gc.collect()
    weights.prune()
    assert weights.nbytes == 48 * 64 * 4
    weights.clear()
    assert weights.nbytes == 0


def test_inputs_of_another_dtype_get_f_linears_own_answer():
    weight = torch.randn(48, 64)
    with pytest.raises(RuntimeError) as expected:
        F.linear(torch.randn(2, 64, dtype=torch.float64), weight)
    with pytest.raises(RuntimeError, match=str(expected.value)[:30]):
        PrepackedWeights().linear(torch.randn(2, 64, dtype=torch.float64), weight)


def test_what_can_be_packed():
    assert prepack_applies(nn.Parameter(torch.randn(4, 4)))
    assert not prepack_applies(torch.randn(4))  # not a matrix
    assert not prepack_applies(torch.randn(4, 4, dtype=torch.float64))
    assert not prepack_applies(torch.randn(4, 4, device="meta"))
    bf16 = prepack_applies(torch.randn(4, 4, dtype=torch.bfloat16))
    assert bf16 == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_prepacked_linear_wraps_a_bias_free_linear_only():
    linear = nn.Linear(64, 48, bias=False)
    x = torch.randn(3, 64)
    _close(PrepackedLinear(linear, PrepackedWeights())(x), linear(x))
    with pytest.raises(ValueError, match="bias-free"):
        PrepackedLinear(nn.Linear(64, 48), PrepackedWeights())

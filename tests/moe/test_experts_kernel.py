"""The padded-layout expert kernel (a custom autograd function) against plain autograd over the same math."""

from __future__ import annotations

import pytest
import torch

from switchformer.layers.activation import Activation, apply_activation
from switchformer.moe.experts import ExpertBatch, GroupedExperts, Layout, _PaddedExperts

E, C, D, F = 3, 5, 8, 6


def _experts(activation: Activation, dropout: float = 0.0, dtype: torch.dtype = torch.float64) -> GroupedExperts:
    torch.manual_seed(0)
    experts = GroupedExperts(E, D, F, activation, dropout=dropout).to(dtype)
    experts.reset_parameters(init_scale=3.0)
    return experts


def _autograd_reference(x_ECD, wi, wo, activation, keep_ECF=None, dropout=0.0):
    h = apply_activation(torch.bmm(x_ECD, wi), activation)
    if keep_ECF is not None:
        h = h * keep_ECF / (1.0 - dropout)
    return torch.bmm(h, wo)


def _grads(out, upstream, *tensors):
    return torch.autograd.grad((out * upstream).sum(), tensors)


@pytest.mark.parametrize("activation", list(Activation))
def test_padded_kernel_matches_autograd(activation):
    experts = _experts(activation)
    x = torch.randn(E * C, D, dtype=torch.float64, requires_grad=True)
    out = experts(ExpertBatch(rows=x, layout=Layout.PADDED, capacity=C, tokens_per_expert=torch.full((E,), C)))
    ref = _autograd_reference(x.view(E, C, D), experts.wi, experts.wo, activation).reshape(E * C, D)
    torch.testing.assert_close(out, ref)
    upstream = torch.randn_like(ref)
    for got, want in zip(
        _grads(out, upstream, x, experts.wi, experts.wo), _grads(ref, upstream, x, experts.wi, experts.wo), strict=True
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("activation", [Activation.RELU, Activation.GATED_SILU])
def test_padded_kernel_dropout_matches_autograd_with_the_same_mask(activation):
    dropout = 0.4
    experts = _experts(activation, dropout=dropout).train()
    x = torch.randn(E * C, D, dtype=torch.float64, requires_grad=True)
    batch = ExpertBatch(rows=x, layout=Layout.PADDED, capacity=C, tokens_per_expert=torch.full((E,), C))
    torch.manual_seed(7)
    out = experts(batch)
    torch.manual_seed(7)  # the kernel draws its mask from the global generator, once, like nn.Dropout
    keep = torch.rand(E, C, F) >= dropout
    assert 0 < int(keep.sum()) < keep.numel()
    ref = _autograd_reference(x.view(E, C, D), experts.wi, experts.wo, activation, keep, dropout).reshape(E * C, D)
    torch.testing.assert_close(out, ref)
    upstream = torch.randn_like(ref)
    for got, want in zip(
        _grads(out, upstream, x, experts.wi, experts.wo), _grads(ref, upstream, x, experts.wi, experts.wo), strict=True
    ):
        torch.testing.assert_close(got, want)


def test_padded_kernel_in_eval_mode_ignores_dropout():
    experts = _experts(Activation.RELU, dropout=0.5).eval()
    x = torch.randn(E * C, D, dtype=torch.float64)
    batch = ExpertBatch(rows=x, layout=Layout.PADDED, capacity=C, tokens_per_expert=torch.full((E,), C))
    ref = _autograd_reference(x.view(E, C, D), experts.wi, experts.wo, Activation.RELU).reshape(E * C, D)
    torch.testing.assert_close(experts(batch), ref)


@pytest.mark.parametrize("activation", [Activation.RELU, Activation.GELU, Activation.GATED_GELU])
def test_padded_kernel_passes_gradcheck(activation):
    torch.manual_seed(0)
    x = torch.randn(E, C, D, dtype=torch.float64, requires_grad=True)
    wi = torch.randn(E, D, F * activation.input_width_multiplier, dtype=torch.float64, requires_grad=True)
    wo = torch.randn(E, F, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, wi, wo: _PaddedExperts.apply(x, wi, wo, activation, 0.0), (x, wi, wo))


def test_padded_kernel_runs_in_bfloat16_under_autocast():
    experts = _experts(Activation.RELU, dtype=torch.float32)
    x = torch.randn(E * C, D, requires_grad=True)
    batch = ExpertBatch(rows=x, layout=Layout.PADDED, capacity=C, tokens_per_expert=torch.full((E,), C))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(batch)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert experts.wi.grad is not None and experts.wi.grad.dtype == torch.float32
    ref = _autograd_reference(x.view(E, C, D), experts.wi, experts.wo, Activation.RELU).reshape(E * C, D)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)

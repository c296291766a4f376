"""The optimizer bounds the layout tests rely on hold for torch's own optimizers, on gradients built to break them."""

from __future__ import annotations

import pytest
import torch

from tests.parallel.tolerances import adafactor_drift_bound, adam_ratio_bound, adamw_drift_bound


def test_adam_ratio_bound_is_one_at_the_first_step_and_worked_by_hand_at_the_second():
    assert adam_ratio_bound(1, (0.9, 0.999)) == pytest.approx(1.0)
    # t = 2: (0.1 / 0.19) * sqrt(1 + 0.81 / 0.999) * sqrt(0.001999 / 0.001)
    assert adam_ratio_bound(2, (0.9, 0.999)) == pytest.approx(0.1 / 0.19 * (1 + 0.81 / 0.999) ** 0.5 * 1.999**0.5)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.98)])
def test_two_adamw_runs_whose_gradients_differ_in_the_last_bits_stay_within_the_drift_bound(betas):
    """Half the gradients change sign between the runs at every step (what a last-bit difference can do to a
    gradient near zero), from 1e-12 to 1: the worst case the bound covers."""
    g = torch.Generator().manual_seed(0)
    lrs = [1e-3, 2e-3, 3e-3, 4e-3]
    a = torch.nn.Parameter(torch.randn(4096, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = torch.optim.AdamW([a], lr=lrs[0], betas=betas, weight_decay=0.1)
    opt_b = torch.optim.AdamW([b], lr=lrs[0], betas=betas, weight_decay=0.1)
    for lr in lrs:
        grad = torch.randn(4096, generator=g) * torch.logspace(-12, 0, 4096)
        a.grad, b.grad = grad, torch.where(torch.arange(4096) < 2048, -grad, grad * (1 + 1e-6))
        for opt in (opt_a, opt_b):
            opt.param_groups[0]["lr"] = lr
            opt.step()
    drift = (a - b).abs().max().item()
    bound = adamw_drift_bound(lrs, betas, weight_scale=a.abs().max().item())
    assert 0.5 * bound < drift <= bound  # reached to within a factor of 2: the bound is not loose


def test_adafactor_updates_stay_within_its_drift_bound_when_gradients_agree_to_float32_rounding():
    g = torch.Generator().manual_seed(1)
    lrs = [1e-2] * 4
    a = torch.nn.Parameter(torch.randn(64, 128, generator=g) * 0.05)
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = torch.optim.Adafactor([a], lr=lrs[0]), torch.optim.Adafactor([b], lr=lrs[0])
    for _ in lrs:
        grad = torch.randn(64, 128, generator=g) * torch.logspace(-12, 0, 128)
        a.grad, b.grad = grad, grad * (1 + 1e-6 * torch.randn(64, 128, generator=g))
        opt_a.step()
        opt_b.step()
    drift = (a - b).abs().max().item()
    assert 0 < drift <= adafactor_drift_bound(lrs, numel=a.numel(), weight_scale=a.abs().max().item())

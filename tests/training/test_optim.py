from __future__ import annotations

import copy
import math

import pytest
import torch

from switchformer.training.config import TrainConfig
from switchformer.training.optim import build_optimizer, fused_adam_supported, lr_multiplier


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


def _set_gradients(model: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _reference_adamw(params, grads_per_step, *, lr, betas, eps, weight_decay_of):
    """AdamW written out (Loshchilov & Hutter: decoupled decay, bias-corrected moments), one tensor at a time."""
    params = [p.detach().clone().double() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2 = betas
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            g = g.double()
            p.mul_(1 - lr * weight_decay_of[i])
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    return params


def test_adamw_is_fused_on_cpu_and_decays_matrices_only():
    model = _model()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    assert all(group["fused"] for group in optimizer.param_groups)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_fused_adamw_updates_match_adamw_written_out():
    model = _model()
    config = TrainConfig(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    optimizer = build_optimizer(model, config)
    start = [p.detach().clone() for p in model.parameters()]
    grads_per_step = []
    for step in range(5):
        _set_gradients(model, step)
        grads_per_step.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    decay_of = [0.1 if p.dim() >= 2 else 0.0 for p in model.parameters()]
    expected = _reference_adamw(start, grads_per_step, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay_of=decay_of)
    for got, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach().double(), want, rtol=0, atol=1e-6)
    assert not torch.equal(next(model.parameters()).detach(), start[0])


def test_a_state_saved_by_the_unfused_optimizer_resumes_in_the_fused_one():
    """Checkpoints written before the fused kernel was used carry on as if nothing changed."""
    config = TrainConfig(lr=1e-2, weight_decay=0.1)
    reference, resumed = _model(), _model()
    old = torch.optim.AdamW(
        [
            {"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=config.betas,
        foreach=False,
    )
    for step in range(3):
        _set_gradients(reference, step)
        old.step()
    resumed.load_state_dict(reference.state_dict())
    new = build_optimizer(resumed, config)
    new.load_state_dict(copy.deepcopy(old.state_dict()))  # as from a file: no tensor shared with `old`
    assert all(group["fused"] for group in new.param_groups)
    for step in range(3, 6):
        _set_gradients(reference, step)
        _set_gradients(resumed, step)
        old.step()
        new.step()
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_fused_kernel_is_asked_for_only_where_torch_has_it():
    assert fused_adam_supported([torch.zeros(3), torch.zeros(2, 2, dtype=torch.bfloat16)])
    assert not fused_adam_supported([])
    assert not fused_adam_supported([torch.zeros(3, dtype=torch.int64)])
    assert not fused_adam_supported([torch.zeros(3, device="meta")])


def test_adafactor_is_built_when_asked():
    optimizer = build_optimizer(_model(), TrainConfig(optimizer="adafactor"))
    assert isinstance(optimizer, torch.optim.Adafactor)


@pytest.mark.parametrize("step", [0, 50, 99, 100, 399, 10_000])
def test_inverse_sqrt_schedule_is_flat_in_warmup_then_falls_as_one_over_root_step(step):
    config = TrainConfig(lr=1e-3, warmup_steps=100, schedule="inverse-sqrt")
    expected = 1.0 if step + 1 <= 100 else math.sqrt(100 / (step + 1))
    assert lr_multiplier(step, config) == pytest.approx(expected)


def test_cosine_schedule_warms_up_linearly_then_decays_to_the_floor():
    config = TrainConfig(lr=1e-3, steps=1100, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, config) == pytest.approx(0.01)
    assert lr_multiplier(99, config) == pytest.approx(1.0)
    assert lr_multiplier(600, config) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(1100, config) == pytest.approx(0.1)

"""The grouped layout stays finite when ``torch._grouped_mm`` leaves rows unwritten, as it does on CUDA.

``_grouped_mm`` computes only the rows inside its offsets; rows past the last offset (those of dropped claims)
are never written, in the output nor in the input's gradient, and on CUDA hold stale memory (inf and NaN
included; a bf16 training run on an H200 turned NaN at step 3 before this was handled). The CPU kernel happens
to leave zeros there, so these tests poison those rows with NaN in both directions and check that training
still gives exactly the padded layout's numbers.
"""

from __future__ import annotations

import copy

import pytest
import torch

from switchformer import ExpertKernel, SwitchFFN

REAL_GROUPED_MM = torch._grouped_mm


class _PoisonedGroupedMM(torch.autograd.Function):
    """``torch._grouped_mm`` with every row past the last offset set to NaN, forward and input gradient."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b, offs)
        out = REAL_GROUPED_MM(a, b, offs=offs).clone()
        out[int(offs[-1]) :] = float("nan")
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        a, b, offs = ctx.saved_tensors
        with torch.enable_grad():
            a_, b_ = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
            grad_a, grad_b = torch.autograd.grad(REAL_GROUPED_MM(a_, b_, offs=offs), (a_, b_), grad)
        grad_a = grad_a.clone()
        grad_a[int(offs[-1]) :] = float("nan")
        return grad_a, grad_b, None


@pytest.fixture
def poisoned_grouped_mm(monkeypatch):
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs=None: _PoisonedGroupedMM.apply(a, b, offs))


CASES = {
    "top1-drops": {"capacity_factor": 1.0},
    "top2-drops": {"top_k": 2, "capacity_factor": 1.0},
    "dropless-with-padding": {"dropless": True},
}


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_grouped_layout_ignores_unwritten_rows(poisoned_grouped_mm, options):
    torch.manual_seed(0)
    padded = SwitchFFN(d_model=16, d_ff=32, num_experts=4, router_jitter=0.0, kernel="padded-bmm", **options)
    grouped = copy.deepcopy(padded)
    grouped.dispatcher.kernel = ExpertKernel.GROUPED_MM
    x = torch.randn(2, 48, 16)
    mask = torch.ones(2, 48, dtype=torch.bool)
    mask[1, 40:] = False  # padding claims no slot: more rows past the last offset
    results = []
    for layer in (padded, grouped):
        x_in = x.clone().requires_grad_(True)
        out = layer(x_in, token_mask=mask)
        (out.hidden_states.square().sum() + out.load_balancing_loss).backward()
        results.append((out, x_in.grad, layer.experts.wi.grad, layer.experts.wo.grad, layer.router.weight.grad))
    (ref, *ref_grads), (got, *got_grads) = results
    assert int((~got.routing.keep & mask.reshape(-1, 1)).sum()) > 0 or options.get("dropless")
    assert torch.isfinite(got.hidden_states).all()
    torch.testing.assert_close(got.hidden_states, ref.hidden_states)
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r)

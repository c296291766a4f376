"""The fast Switch layer against the slow loop reference: same choices, drops, outputs and gradients."""

from __future__ import annotations

import itertools

import pytest
import torch

from switchformer import ExpertKernel, SwitchFFN
from switchformer.moe.assignment import expert_capacity, group_sizes
from tests.reference.moe_reference import reference_moe

D, F = 16, 24


def _layer(**kwargs) -> SwitchFFN:
    torch.manual_seed(0)
    layer = SwitchFFN(d_model=D, d_ff=F, router_jitter=0.0, **kwargs)
    with torch.no_grad():  # a router with some spread, so capacity actually binds
        layer.router.weight.normal_(std=1.0)
    return layer


def _expected_capacity(layer: SwitchFFN, sizes: list[int]) -> list[int] | None:
    moe = layer.config.moe
    if moe.dropless:
        return None
    if moe.expert_capacity is not None:
        return [moe.expert_capacity] * len(sizes)
    factor = moe.capacity_factor_for(layer.training)
    return [expert_capacity(n, moe.num_experts, factor, moe.min_capacity) for n in sizes]


def _check(layer: SwitchFFN, x: torch.Tensor, sizes: list[int], token_mask: torch.Tensor | None = None) -> None:
    moe = layer.config.moe
    x_fast = x.clone().requires_grad_(True)
    out = layer(x_fast, token_mask=token_mask)

    x_ref = x.reshape(-1, D).clone().requires_grad_(True)
    router_w = layer.router.weight.detach().clone().requires_grad_(True)
    wi = layer.experts.wi.detach().clone().requires_grad_(True)
    wo = layer.experts.wo.detach().clone().requires_grad_(True)
    ref = reference_moe(
        x_ref,
        router_w,
        wi,
        wo,
        activation=layer.config.activation.value,
        top_k=moe.top_k,
        group_sizes=sizes,
        capacity=_expected_capacity(layer, sizes),
        by_confidence=moe.priority.value == "confidence",
        next_best=moe.overflow.value == "next-best",
        token_mask=None if token_mask is None else token_mask.reshape(-1).tolist(),
    )

    routing = out.routing
    fast_expert = torch.where(routing.keep, routing.expert_index, -1).tolist()
    assert fast_expert == ref.expert, "expert choices / dropped tokens differ from the reference"
    torch.testing.assert_close(out.hidden_states.reshape(-1, D), ref.output, atol=1e-5, rtol=1e-5)

    upstream = torch.randn_like(ref.output)
    (out.hidden_states.reshape(-1, D) * upstream).sum().backward()
    (ref.output * upstream).sum().backward()
    torch.testing.assert_close(x_fast.grad.reshape(-1, D), x_ref.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.router.weight.grad, router_w.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.experts.wi.grad, wi.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.experts.wo.grad, wo.grad, atol=1e-5, rtol=1e-4)


KERNELS = [ExpertKernel.PADDED_BMM, ExpertKernel.GROUPED_MM]


@pytest.mark.parametrize(
    ("top_k", "priority", "kernel"),
    list(itertools.product([1, 2], ["position", "confidence"], KERNELS)),
)
def test_grouped_capacity_matches_reference(top_k, priority, kernel):
    layer = _layer(num_experts=4, top_k=top_k, capacity_factor=1.0, min_capacity=1, group_size=10,
                   priority=priority, kernel=kernel)  # fmt: skip
    x = torch.randn(3, 12, D)  # 36 tokens: groups of 10, 10, 10 and a remainder of 6
    sizes = group_sizes(36, 10)
    assert sizes == [10, 10, 10, 6]
    _check(layer, x, sizes)
    assert float(layer(x).dropped_fraction) > 0, "the test must exercise dropping"


@pytest.mark.parametrize(("top_k", "kernel"), list(itertools.product([1, 2], KERNELS)))
def test_dropless_matches_reference(top_k, kernel):
    layer = _layer(num_experts=5, top_k=top_k, dropless=True, kernel=kernel)
    x = torch.randn(2, 9, D)
    _check(layer, x, group_sizes(18, 1024))
    assert float(layer(x).dropped_fraction) == 0.0


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_token_left_behind_matches_reference(kernel):
    layer = _layer(num_experts=4, capacity_factor=1.0, min_capacity=1, grouping="batch", overflow="next-best",
                   kernel=kernel)  # fmt: skip
    x = torch.randn(2, 10, D)
    _check(layer, x, [20])
    # With total capacity equal to the token count, re-routing finds every token a slot.
    assert float(layer(x).dropped_fraction) == 0.0


def test_sequence_grouping_with_fixed_capacity_matches_reference():
    layer = _layer(num_experts=4, grouping="sequence", expert_capacity=2)
    x = torch.randn(3, 7, D)
    _check(layer, x, [7, 7, 7])


def test_padding_tokens_claim_no_slot_and_match_reference():
    layer = _layer(num_experts=3, capacity_factor=1.0, min_capacity=1, grouping="batch")
    x = torch.randn(2, 8, D)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 6:] = False
    _check(layer, x, [16], token_mask=mask)
    out = layer(x, token_mask=mask)
    assert torch.all(out.hidden_states[~mask] == 0)


@pytest.mark.parametrize(
    ("top_k", "overflow", "kernel"),
    [
        (k, o, kernel)
        for k, o in [(1, "drop"), (2, "drop"), (1, "next-best")]
        for kernel in [*KERNELS, ExpertKernel.LOOP]
    ],
)
def test_one_token_groups_match_reference(top_k, overflow, kernel):
    """A decoding step routed per sequence: one token a group, where route() skips ranking the claims."""
    layer = _layer(num_experts=4, top_k=top_k, grouping="sequence", expert_capacity=1, overflow=overflow,
                   kernel=kernel)  # fmt: skip
    x = torch.randn(6, 1, D)
    mask = torch.tensor([True, True, False, True, True, True])[:, None]  # a finished beam's padding
    _check(layer, x, [1] * 6, token_mask=mask)
    routing = layer(x, token_mask=mask).routing
    assert routing.keep.tolist() == [[bool(m)] * top_k for m in mask.flatten()]
    assert routing.position.eq(0).all()


@pytest.mark.parametrize("activation", ["gelu", "gated-gelu", "gated-silu"])
def test_activations_match_reference(activation):
    layer = _layer(num_experts=3, dropless=True, activation=activation)
    _check(layer, torch.randn(2, 5, D), [10])


def test_eval_mode_uses_eval_capacity_factor():
    layer = _layer(num_experts=4, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=1, grouping="batch")
    x = torch.randn(1, 40, D)
    assert layer(x).routing.capacity == 10
    layer.eval()
    assert layer(x).routing.capacity == 20
    _check(layer, x, [40])


def test_dropped_tokens_output_zero_so_the_residual_carries_them():
    layer = _layer(num_experts=2, capacity_factor=0.25, min_capacity=1, grouping="batch")
    x = torch.randn(1, 16, D)
    out = layer(x)
    dropped = ~out.routing.keep[:, 0]
    assert int(dropped.sum()) == 16 - 2 * 2  # capacity round(0.25 * 16 / 2) = 2 slots per expert
    assert torch.all(out.hidden_states.reshape(-1, D)[dropped] == 0)
    assert torch.all(out.hidden_states.reshape(-1, D)[~dropped].abs().sum(-1) > 0)

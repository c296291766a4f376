"""The looped layout (one matmul per expert over exactly its kept rows) and the per-call layout choice.

The same routing, drops, outputs and gradients as the loop reference, for the cases the padded and grouped
layouts are checked on; rows that follow the kept tokens rather than the capacity.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from switchformer import ExpertKernel, MoEConfig, SwitchFFN
from switchformer.layers.activation import Activation, apply_activation
from switchformer.moe.assignment import group_sizes, route
from switchformer.moe.dispatch import LocalDispatcher, choose_layout
from switchformer.moe.experts import ExpertBatch, GroupedExperts, Layout, _ExpertFFN, _PerExpertMatmuls
from tests.moe.test_moe_against_reference import D, _check, _layer

LOOP = ExpertKernel.LOOP


# -- against the loop reference ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("top_k", "priority"), list(itertools.product([1, 2], ["position", "confidence"])))
def test_capacity_with_drops_matches_reference(top_k, priority):
    layer = _layer(num_experts=4, top_k=top_k, capacity_factor=1.0, min_capacity=1, group_size=10,
                   priority=priority, kernel=LOOP)  # fmt: skip
    x = torch.randn(3, 12, D)
    _check(layer, x, group_sizes(36, 10))
    assert float(layer(x).dropped_fraction) > 0, "the test must exercise dropping"


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_matches_reference(top_k):
    layer = _layer(num_experts=5, top_k=top_k, dropless=True, kernel=LOOP)
    _check(layer, torch.randn(2, 9, D), [18])


def test_no_token_left_behind_matches_reference():
    layer = _layer(num_experts=4, capacity_factor=1.0, min_capacity=1, grouping="batch", overflow="next-best",
                   kernel=LOOP)  # fmt: skip
    _check(layer, torch.randn(2, 10, D), [20])


@pytest.mark.parametrize("kernel", [LOOP, ExpertKernel.PADDED_BMM])
def test_short_sequences_with_a_large_fixed_capacity_match_reference(kernel):
    """Decoding-step shapes: groups of one token each against a capacity of 64 per group."""
    layer = _layer(num_experts=4, grouping="sequence", expert_capacity=64, kernel=kernel).eval()
    x = torch.randn(5, 1, D)
    _check(layer, x, [1] * 5)
    batch, _ = layer.dispatcher.dispatch(x.reshape(-1, D), layer(x).routing)
    # padded: each expert gets the rows its busiest case can need, 5 tokens, not 5 groups x 64 slots
    assert batch.rows.shape[0] == (5 if kernel is LOOP else 4 * 5)


def test_padding_tokens_claim_no_row_and_match_reference():
    """Top-2 over per-sequence groups with a capacity that binds: padding takes neither a slot nor a row."""
    layer = _layer(num_experts=3, top_k=2, grouping="sequence", expert_capacity=3, kernel=LOOP)
    x = torch.randn(3, 6, D)
    mask = torch.arange(6) < torch.tensor([[6], [4], [1]])
    _check(layer, x, [6, 6, 6], token_mask=mask)
    out = layer(x, token_mask=mask)
    assert float(out.dropped_fraction) > 0, "the test must exercise dropping"
    assert torch.all(out.hidden_states[~mask] == 0)
    batch, _ = layer.dispatcher.dispatch(x.reshape(-1, D), out.routing)
    assert batch.layout is Layout.LOOPED and batch.rows.shape[0] == int(out.routing.keep.sum())


@pytest.mark.parametrize("activation", ["gelu", "gated-gelu", "gated-silu"])
def test_activations_match_reference(activation):
    layer = _layer(num_experts=3, capacity_factor=1.0, min_capacity=1, activation=activation, kernel=LOOP)
    _check(layer, torch.randn(2, 5, D), group_sizes(10, 1024))


def test_every_claim_dropped_gives_zero_output_and_gradients():
    layer = _layer(num_experts=2, kernel=LOOP)
    x = torch.randn(1, 4, D, requires_grad=True)
    out = layer(x, token_mask=torch.zeros(1, 4, dtype=torch.bool))
    out.hidden_states.sum().backward()
    assert torch.all(out.hidden_states == 0) and torch.all(x.grad == 0)
    assert torch.all(layer.experts.wi.grad == 0) and torch.all(layer.experts.wo.grad == 0)


# -- the same numbers as the other layouts ----------------------------------------------------------------------
CASES = {"top2-drops": {"top_k": 2, "capacity_factor": 1.0}, "dropless": {"dropless": True}}


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_looped_equals_padded_on_the_same_routing(options):
    torch.manual_seed(0)
    padded = SwitchFFN(d_model=D, d_ff=24, num_experts=4, router_jitter=0.0, kernel="padded-bmm", **options)
    looped = SwitchFFN(d_model=D, d_ff=24, num_experts=4, router_jitter=0.0, kernel="loop", **options)
    looped.load_state_dict(padded.state_dict())
    x = torch.randn(3, 16, D)
    results = []
    for layer in (padded, looped):
        x_in = x.clone().requires_grad_(True)
        out = layer(x_in)
        (out.hidden_states.square().sum() + out.load_balancing_loss).backward()
        results.append([out.hidden_states, x_in.grad, *(p.grad for p in layer.parameters())])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- the kernel -------------------------------------------------------------------------------------------------
def _kernel_inputs(counts: list[int], rows: int, activation: Activation):
    torch.manual_seed(0)
    experts, d, f = len(counts), 6, 5
    x = torch.randn(rows, d, dtype=torch.float64, requires_grad=True)
    wi = torch.randn(experts, d, f * activation.input_width_multiplier, dtype=torch.float64, requires_grad=True)
    wo = torch.randn(experts, f, d, dtype=torch.float64, requires_grad=True)
    return x, wi, wo


def _autograd_reference(x, wi, wo, counts, activation, keep=None, dropout=0.0):
    outputs, start = [], 0
    for expert, count in enumerate(counts):
        h = apply_activation(x[start : start + count] @ wi[expert], activation)
        if keep is not None:
            h = h * keep[start : start + count] / (1.0 - dropout)
        outputs.append(h @ wo[expert])
        start += count
    outputs.append(x.new_zeros(x.shape[0] - start, x.shape[1]))
    return torch.cat(outputs)


@pytest.mark.parametrize("activation", list(Activation))
def test_per_expert_kernel_matches_autograd_with_empty_experts_and_unused_rows(activation):
    counts = [3, 0, 4, 0, 2]  # experts 1 and 3 hold no row; 2 rows past the counts' sum
    x, wi, wo = _kernel_inputs(counts, 11, activation)
    out = _ExpertFFN.apply(x, wi, wo, activation, 0.0, _PerExpertMatmuls(counts))
    ref = _autograd_reference(x, wi, wo, counts, activation)
    torch.testing.assert_close(out, ref)
    assert torch.all(out[9:] == 0)
    upstream = torch.randn_like(ref)
    got = torch.autograd.grad((out * upstream).sum(), (x, wi, wo))
    want = torch.autograd.grad((ref * upstream).sum(), (x, wi, wo))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert torch.all(got[1][[1, 3]] == 0) and torch.all(got[2][[1, 3]] == 0)


@pytest.mark.parametrize("activation", [Activation.RELU, Activation.GATED_SILU])
def test_per_expert_kernel_dropout_matches_autograd_with_the_same_mask(activation):
    counts, dropout = [4, 1, 3], 0.4
    x, wi, wo = _kernel_inputs(counts, 8, activation)
    torch.manual_seed(7)
    out = _ExpertFFN.apply(x, wi, wo, activation, dropout, _PerExpertMatmuls(counts))
    torch.manual_seed(7)  # the kernel draws its mask from the global generator, once, like nn.Dropout
    keep = torch.rand(8, wo.shape[1]) >= dropout
    ref = _autograd_reference(x, wi, wo, counts, activation, keep, dropout)
    torch.testing.assert_close(out, ref)
    upstream = torch.randn_like(ref)
    got = torch.autograd.grad((out * upstream).sum(), (x, wi, wo))
    want = torch.autograd.grad((ref * upstream).sum(), (x, wi, wo))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_per_expert_kernel_passes_gradcheck():
    counts = [2, 0, 3]
    x, wi, wo = _kernel_inputs(counts, 6, Activation.GELU)
    matmuls = _PerExpertMatmuls(counts)
    assert torch.autograd.gradcheck(lambda x, wi, wo: _ExpertFFN.apply(x, wi, wo, Activation.GELU, 0.0, matmuls),
                                    (x, wi, wo))  # fmt: skip


def test_looped_experts_run_in_bfloat16_under_autocast():
    torch.manual_seed(0)
    experts = GroupedExperts(3, 8, 6, Activation.RELU)
    x = torch.randn(7, 8, requires_grad=True)
    batch = ExpertBatch(rows=x, layout=Layout.LOOPED, capacity=0, tokens_per_expert=torch.tensor([4, 0, 3]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(batch)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert experts.wi.grad is not None and experts.wi.grad.dtype == torch.float32
    ref = _autograd_reference(x, experts.wi, experts.wo, [4, 0, 3], Activation.RELU)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


# -- the choice -------------------------------------------------------------------------------------------------
def test_auto_takes_the_looped_layout_in_eager_cpu_code_and_grouped_gemm_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_layout(ExpertKernel.AUTO, cpu) is Layout.LOOPED
    assert choose_layout(ExpertKernel.AUTO, cuda) is Layout.GROUPED
    assert choose_layout(ExpertKernel.PADDED_BMM, cpu) is Layout.PADDED
    assert choose_layout(ExpertKernel.GROUPED_MM, cpu) is Layout.GROUPED
    assert choose_layout(LOOP, cuda) is Layout.LOOPED


def test_looped_rows_are_exactly_the_kept_claims():
    config = MoEConfig(num_experts=4, top_k=2, grouping="sequence", expert_capacity=3)
    routing = route(torch.randn(24, 4) * 3, config, training=False, sequence_length=8)
    batch, state = LocalDispatcher(4, LOOP).dispatch(torch.randn(24, D), routing)
    kept = int(routing.keep.sum())
    assert kept < 24 * 2 and batch.rows.shape[0] == kept
    assert batch.tokens_per_expert.sum() == kept
    assert sorted(state.row_of_claim[routing.keep].tolist()) == list(range(kept))
    assert torch.all(state.row_of_claim[~routing.keep] == kept)

"""The local dispatcher's gather-only dispatch and combine against index_select and autograd."""

from __future__ import annotations

import pytest
import torch

from switchformer import MoEConfig
from switchformer.moe.assignment import route
from switchformer.moe.config import ExpertKernel
from switchformer.moe.dispatch import DispatchState, LocalDispatcher, _CombineClaims, _GatherRows

T, D, NUM_EXPERTS = 12, 5, 3


def _routing(top_k: int, **changes):
    torch.manual_seed(0)
    config = MoEConfig(num_experts=NUM_EXPERTS, top_k=top_k, capacity_factor=1.0, min_capacity=1, **changes)
    return route(torch.randn(T, NUM_EXPERTS) * 3, config, training=True)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("kernel", [ExpertKernel.PADDED_BMM, ExpertKernel.GROUPED_MM])
def test_dispatch_then_combine_matches_an_index_select_formulation(top_k, kernel):
    routing = _routing(top_k)
    assert not bool(routing.keep.all()), "the test must exercise dropped claims"
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    gate = routing.gate.double().detach().requires_grad_(True)
    routing.gate = gate
    dispatcher = LocalDispatcher(NUM_EXPERTS, kernel)
    batch, state = dispatcher.dispatch(x, routing)
    scale_R = torch.linspace(0.5, 2.0, batch.rows.shape[0], dtype=torch.float64)[:, None]  # a stand-in expert
    out = dispatcher.combine(batch.rows * scale_R, routing, state)

    # The same through index_select with an appended zero row, differentiated by autograd.
    row_TK = state.row_of_claim
    num_rows = batch.rows.shape[0]
    token_of_row = torch.full((num_rows + 1,), T, dtype=torch.long)
    token_of_row.scatter_(0, row_TK.reshape(-1), torch.arange(T).repeat_interleave(top_k))
    rows = torch.cat([x, x.new_zeros(1, D)]).index_select(0, token_of_row[:num_rows])
    y = torch.cat([rows * scale_R, x.new_zeros(1, D)])
    ref = (y.index_select(0, row_TK.reshape(-1)).view(T, top_k, D) * (gate * routing.keep)[..., None]).sum(1)

    torch.testing.assert_close(batch.rows, rows)
    torch.testing.assert_close(out, ref)
    upstream = torch.randn(T, D, dtype=torch.float64)
    got = torch.autograd.grad((out * upstream).sum(), (x, gate))
    want = torch.autograd.grad((ref * upstream).sum(), (x, gate))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_empty_rows_are_zero_and_dropped_tokens_get_no_output():
    routing = _routing(1)
    x = torch.randn(T, D) + 10.0  # no real row is zero
    batch, state = LocalDispatcher(NUM_EXPERTS, ExpertKernel.PADDED_BMM).dispatch(x, routing)
    used = torch.zeros(batch.rows.shape[0], dtype=torch.bool)
    used[state.row_of_claim[routing.keep]] = True
    assert torch.all(batch.rows[~used] == 0) and torch.all(batch.rows[used] != 0)
    out = LocalDispatcher(NUM_EXPERTS).combine(batch.rows, routing, state)
    assert torch.all(out[~routing.keep[:, 0]] == 0)


def test_gather_and_combine_functions_pass_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    row_TK = torch.tensor([[2, 5], [0, 6], [6, 1], [3, 4]])  # 6 rows; row 6 = dropped
    token_of_row = torch.tensor([1, 2, 0, 3, 3, 0])  # consistent with row_TK
    gate = torch.rand(4, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _GatherRows.apply(x, token_of_row, row_TK), (x,))
    assert torch.autograd.gradcheck(lambda y, g: _CombineClaims.apply(y, g, row_TK), (y, gate))


def test_combine_accepts_a_state_built_by_another_dispatcher():
    """The expert-parallel dispatcher builds ``DispatchState(row_of_claim=...)`` over the rows that came back."""
    routing = _routing(1)
    rows = torch.randn(T, D)
    state = DispatchState(row_of_claim=torch.where(routing.keep, torch.arange(T)[:, None], T))
    out = LocalDispatcher(NUM_EXPERTS).combine(rows, routing, state)
    expected = torch.where(routing.keep, routing.gate, 0) * rows
    torch.testing.assert_close(out, expected)


def test_the_local_and_the_all_to_all_dispatchers_declare_the_token_dispatcher_interface():
    from switchformer.moe import SwitchFFN, TokenDispatcher
    from switchformer.parallel.expert_parallel import AllToAllDispatcher

    assert issubclass(LocalDispatcher, TokenDispatcher) and issubclass(AllToAllDispatcher, TokenDispatcher)
    assert isinstance(SwitchFFN(d_model=8, d_ff=16, num_experts=2).dispatcher, TokenDispatcher)

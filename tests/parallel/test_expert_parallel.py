"""Expert parallelism on 2 and 4 gloo processes against the single-process Switch layer.

The rule these tests hold parallel code to: a run over several ranks computes what one process computes on the same
global batch (outputs, losses, gradients), checked on real processes rather than on mocks. The whole model under
every layout is in test_fsdp.py.
"""

from __future__ import annotations

import pytest

from tests.parallel import workers
from tests.parallel.launcher import run_and_check

ALL_FFN_CASES = list(workers.FFN_CASES)
EP2 = {"expert_parallel": 2, "dp_shard": 1}


def test_switch_ffn_matches_one_process_on_2_ranks():
    run_and_check(workers.check_switch_ffn, 2, dims=EP2, cases=ALL_FFN_CASES)


def test_degenerate_routing_neither_hangs_nor_crashes():
    """Rank 1 holds only padding: it sends nothing and receives nothing, and still takes part in every exchange."""
    results = run_and_check(workers.check_degenerate_routing, 2, dims=EP2, timeout_s=60)
    assert results[1]["splits"] == ([0, 0], [0, 0])  # nothing out, nothing in: expert 0 lives on rank 0
    assert results[0]["splits"] == ([6, 0], [6, 0])  # rank 0 keeps its own 2 x 3 tokens and gets none


@pytest.mark.slow
def test_switch_ffn_4_ranks_all_cases():
    run_and_check(workers.check_switch_ffn, 4, dims={"expert_parallel": 4, "dp_shard": 1}, cases=ALL_FFN_CASES)


@pytest.mark.slow
def test_switch_ffn_2_by_2_all_cases():
    """Two ep groups: each expert slice lives on two ranks, whose gradients are summed."""
    run_and_check(workers.check_switch_ffn, 4, dims={"expert_parallel": 2, "dp_shard": 2}, cases=ALL_FFN_CASES)


@pytest.mark.slow
def test_degenerate_routing_4_ranks():
    results = run_and_check(workers.check_degenerate_routing, 4, dims={"expert_parallel": 4, "dp_shard": 1})
    assert results[1]["splits"] == ([0, 0, 0, 0], [0, 0, 0, 0])

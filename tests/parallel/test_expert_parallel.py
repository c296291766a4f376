"""Expert parallelism on 2 and 4 gloo processes against the single-process model.

The rule these tests hold parallel code to: a run over several ranks computes what one process computes on the same
global batch (losses, gradients, updates), checked on real processes rather than on mocks.
"""

from __future__ import annotations

import pytest

from tests.parallel import workers
from tests.parallel.launcher import run_and_check

ALL_FFN_CASES = list(workers.FFN_CASES)


def test_switch_ffn_matches_one_process_on_2_ranks():
    run_and_check(workers.check_switch_ffn, 2, ep=2, cases=ALL_FFN_CASES)


def test_model_training_matches_one_process_on_2_ranks():
    results = run_and_check(workers.check_model_training, 2, ep=2)
    assert results[0] == results[1]  # every rank reports the same global losses


def test_activation_checkpointing_under_expert_parallelism_matches_one_process():
    """Each rank recomputes its blocks in backward, all-to-alls included, in the same order on every rank."""
    run_and_check(workers.check_model_training, 2, ep=2, activation_checkpointing=1)


def test_adafactor_under_expert_parallelism_matches_one_process():
    """Its relative step size and update clipping take norms over whole expert weights, not a rank's slice."""
    run_and_check(workers.check_model_training, 2, ep=2, optimizer_kind="adafactor")


def test_degenerate_routing_neither_hangs_nor_crashes():
    run_and_check(workers.check_degenerate_routing, 2, ep=2, timeout_s=60)


def test_expert_parallel_4_ranks():
    run_and_check(workers.check_model_training, 4, ep=4, steps=2)


def test_expert_parallel_2_by_data_parallel_2():
    run_and_check(workers.check_model_training, 4, ep=2, steps=2)


@pytest.mark.slow
def test_adafactor_2_by_data_parallel_2():
    run_and_check(workers.check_model_training, 4, ep=2, steps=2, optimizer_kind="adafactor")


@pytest.mark.slow
def test_switch_ffn_4_ranks_all_cases():
    run_and_check(workers.check_switch_ffn, 4, ep=4, cases=ALL_FFN_CASES)


@pytest.mark.slow
def test_switch_ffn_2_by_2_all_cases():
    run_and_check(workers.check_switch_ffn, 4, ep=2, cases=ALL_FFN_CASES)


@pytest.mark.slow
def test_degenerate_routing_4_ranks():
    run_and_check(workers.check_degenerate_routing, 4, ep=4, timeout_s=60)


@pytest.mark.slow
def test_pure_data_parallel_on_2_ranks():
    run_and_check(workers.check_model_training, 2, ep=1, steps=2)

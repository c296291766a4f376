"""A rank that dies or hangs makes the others fail with a clear error within a bounded time."""

from __future__ import annotations

import pytest

from tests.parallel import workers
from tests.parallel.launcher import run_ranks

TIMEOUT_S = 3.0  # the process-group timeout the ranks run with: the knob that bounds every wait
EP2 = {"expert_parallel": 2, "dp_shard": 1}
# Ranks 0 and 1 form one of two ep groups: the all-to-all runs on a subgroup of the world, not the default group.
EP2_BY_2 = {"expert_parallel": 2, "dp_shard": 2}


def _survivor(results):
    assert results[1].exitcode != 0 or not results[1].reported, "rank 1 was meant to drop out"
    survivor = results[0]
    assert survivor.error is None, survivor.error
    assert survivor.reported, f"rank 0 did not report (exit code {survivor.exitcode}; None = hung until killed)"
    return survivor.value


@pytest.mark.parametrize(
    ("worker", "operation"),
    [
        (workers.check_dead_peer, "expert-parallel all-to-all"),
        (workers.check_dead_peer_while_decoding, "the all-reduce agreeing to stop decoding"),  # finetune's generate
    ],
    ids=["training step", "decoding"],
)
def test_dead_rank_makes_the_survivor_fail_fast(worker, operation):
    value = _survivor(run_ranks(worker, 2, timeout_s=60, dims=EP2, timeout_s_pg=TIMEOUT_S))
    assert value["error"] is not None, "the survivor's step succeeded although its peer was dead"
    assert operation in value["error"] and "rank 0" in value["error"], value["error"]
    assert value["seconds"] < TIMEOUT_S + 5, value


@pytest.mark.parametrize(("world", "dims"), [(2, EP2), (4, EP2_BY_2)], ids=["2 ranks", "4 ranks, ep subgroup"])
def test_hung_rank_makes_the_survivor_fail_after_the_timeout(world, dims):
    """The hung rank exits 5 s past the timeout; the survivor must give up at the timeout, not when it exits. On 4
    ranks the all-to-all runs on a subgroup the mesh created (it used to get torch's 30-minute default)."""
    value = _survivor(run_ranks(workers.check_hung_peer, world, timeout_s=90, dims=dims, timeout_s_pg=TIMEOUT_S))
    assert value["error"] is not None, "the survivor's step succeeded although its peer never joined"
    assert "process-group timeout" in value["error"] and "Timed out" in value["error"], value["error"]
    assert TIMEOUT_S - 0.5 < value["seconds"] < TIMEOUT_S + 3.5, value

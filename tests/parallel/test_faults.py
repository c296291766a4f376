"""A rank that dies or hangs makes the others fail with a clear error within a bounded time."""

from __future__ import annotations

import pytest

from tests.parallel import workers
from tests.parallel.launcher import run_ranks

TIMEOUT_S = 3.0  # the process-group timeout the ranks run with: the knob that bounds every wait


def _survivor(results):
    assert results[1].exitcode != 0 or not results[1].reported, "rank 1 was meant to drop out"
    survivor = results[0]
    assert survivor.error is None, survivor.error
    assert survivor.reported, f"rank 0 did not report (exit code {survivor.exitcode}; None = hung until killed)"
    return survivor.value


@pytest.mark.parametrize(
    ("worker", "operation"),
    [(workers.check_dead_peer, "expert-parallel all-to-all"),
     (workers.check_dead_peer_while_decoding, "the all-reduce agreeing to stop decoding")],  # finetune's generate
    ids=["training step", "decoding"],
)  # fmt: skip
def test_dead_rank_makes_the_survivor_fail_fast(worker, operation):
    value = _survivor(run_ranks(worker, 2, timeout_s=60, ep=2, timeout_s_pg=TIMEOUT_S))
    assert value["error"] is not None, "the survivor's step succeeded although its peer was dead"
    assert operation in value["error"] and "rank 0" in value["error"], value["error"]
    assert value["seconds"] < TIMEOUT_S + 5, value


def test_hung_rank_makes_the_survivor_fail_after_the_timeout():
    value = _survivor(run_ranks(workers.check_hung_peer, 2, timeout_s=60, ep=2, timeout_s_pg=TIMEOUT_S))
    assert value["error"] is not None, "the survivor's step succeeded although its peer never joined"
    assert "process-group timeout" in value["error"], value["error"]
    assert TIMEOUT_S - 0.5 < value["seconds"] < TIMEOUT_S + 5, value

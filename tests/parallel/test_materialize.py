"""The same seed gives the same initial weights in every layout: each rank's materialised rows are exactly those rows
of ``build_model(config, seed=s)`` in one process, bit for bit. (The real-process runs of test_fsdp.py also gather
the whole initial model in each of their layouts and compare it.)"""

from __future__ import annotations

import pytest
import torch

from switchformer import build_model
from switchformer.training.strategy import SingleProcess
from tests.parallel import workers
from tests.parallel.launcher import run_and_check


def test_every_rank_holds_exactly_its_rows_of_the_one_process_model():
    """3 ranks: 64 vocabulary rows, 8 experts and 32-row weights split unevenly, as torch.chunk splits them (22,
    22, 20; 3, 3, 2; 11, 11, 10); each rank checks its rows against one process's (workers.check_initial_weights)."""
    config = workers.tiny_model_config()
    results = run_and_check(workers.check_initial_weights, 3, dims={"dp_shard": 3}, seed=7)
    for name, param in build_model(config, seed=7).named_parameters():
        rows = param.shape[0] if param.dim() else 1
        chunks = [len(c) for c in torch.arange(rows).chunk(3)]
        sizes = [r["held"][name][1] for r in results]
        assert sizes == chunks + [0] * (3 - len(chunks)), (name, sizes)
        starts = [r["held"][name][0] for r, n in zip(results, sizes, strict=True) if n]
        assert starts == [sum(chunks[:i]) for i in range(len(chunks))], (name, starts)


def test_one_process_materialises_a_meta_model_as_build_model_does():
    config = workers.tiny_model_config()
    model = SingleProcess().prepare_model(build_model(config, device="meta"), device=torch.device("cpu"), seed=7)
    expected = build_model(config, seed=7).state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())


def test_another_seed_gives_other_weights():
    config = workers.tiny_model_config()
    a, b = build_model(config, seed=0).state_dict(), build_model(config, seed=1).state_dict()
    assert all(torch.equal(a[n], b[n]) == bool(a[n].std() == 0) for n in a)  # only the constant norm weights agree


def test_initial_weights_fill_only_a_meta_model():
    config = workers.tiny_model_config()
    with pytest.raises(ValueError, match="built on the meta device"):
        SingleProcess().prepare_model(build_model(config), device=torch.device("cpu"), seed=0, fill=lambda m: None)

"""What the report and the plots derive from run records: the dense seeds' noise and the expert sweep."""

from __future__ import annotations

import pytest

from switchformer.experiments.plan import RunKind
from switchformer.experiments.results import dense_noise, expert_sweep

from .conftest import synthetic_run

DENSE_0 = synthetic_run("dense-seed0", RunKind.DENSE, (4.0, 3.0, 2.5, 2.2))
DENSE_1 = synthetic_run("dense-seed1", RunKind.DENSE, (4.4, 3.2, 2.7, 2.6), seed=1)


def _switch(experts: int, final: float, *, factor: float = 1.25, seed: int = 0):
    name = f"switch-{experts}-cf{factor:g}-s{seed}"
    return synthetic_run(name, RunKind.SWITCH, (3.9, 2.9, 2.4, final), experts=experts, factor=factor, seed=seed)


def test_dense_noise_is_the_sample_std_of_the_dense_seeds_final_losses():
    switch = _switch(8, 1.0)  # not a dense seed: left out
    # Final losses 2.2 and 2.6: mean 2.4, sample variance (0.04 + 0.04) / 1, std 0.2828.
    assert dense_noise([DENSE_0, DENSE_1, switch]) == pytest.approx(0.08**0.5)
    assert dense_noise([DENSE_0, switch]) is None


def test_the_sweep_takes_the_shared_capacity_factor_and_the_reference_seed_sorted_by_experts():
    sweep = [_switch(32, 2.0), _switch(2, 2.15), _switch(8, 2.1)]  # at 1.25, out of order
    capacity = [_switch(8, 1.9, factor=1.0), _switch(8, 2.3, factor=2.0)]  # the capacity-factor runs: one each
    other_seed = _switch(8, 1.5, seed=1)  # another seed's Switch-8 at the sweep's factor
    runs = [DENSE_0, DENSE_1, *sweep, *capacity, other_seed]
    sweep = expert_sweep(runs, DENSE_0)
    assert sweep.capacity_factor == 1.25
    assert sweep.points == [(1, 2.2), (2, 2.15), (8, 2.1), (32, 2.0)]


def test_a_dense_only_comparison_has_just_the_reference_point():
    sweep = expert_sweep([DENSE_0, DENSE_1], DENSE_1)
    assert sweep.capacity_factor is None and sweep.points == [(1, 2.6)]

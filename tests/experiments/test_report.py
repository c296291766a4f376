"""The report's checks on synthetic run results, every expected value worked by hand."""

from __future__ import annotations

import dataclasses

import pytest

from switchformer.experiments.plan import RunKind
from switchformer.experiments.report import _machine_lines, _progress_lines, growth_lines, table_lines, verdict

from .conftest import synthetic_run

DENSE_0 = synthetic_run("dense-seed0", RunKind.DENSE, (4.0, 3.0, 2.5, 2.2))
DENSE_1 = synthetic_run("dense-seed1", RunKind.DENSE, (4.4, 3.2, 2.7, 2.4), seed=1)
SWITCH = synthetic_run("switch-8", RunKind.SWITCH, (3.8, 2.6, 2.0, 1.8), experts=8)


def test_the_best_run_is_also_measured_against_every_dense_seed_and_their_mean():
    check = verdict([DENSE_0, DENSE_1, SWITCH])
    assert check.reference == "dense-seed0" and check.best_by_steps == "switch-8"
    # Against its twin (2.2): Switch crosses between 200 (2.6) and 300 (2.0) at 200 + 0.4/0.6 * 100.
    assert check.best_step_speedup == pytest.approx(400 / (200 + 40 / 0.6))
    seeds = check.against_seeds
    # The mean curve is (4.2, 3.1, 2.6, 2.3): Switch reaches 2.3 at 250 steps. Against dense seed 1 alone (2.4):
    # at 200 + 0.2/0.6 * 100.
    assert seeds.mean_final_loss == pytest.approx(2.3)
    assert seeds.mean.step_speedup == pytest.approx(400 / 250)
    per_seed = {"dense-seed0": check.best_step_speedup, "dense-seed1": 400 / (200 + 20 / 0.6)}
    assert seeds.per_seed == pytest.approx(per_seed)
    line = next(line for line in check.lines() if line.startswith("- Against every dense seed"))
    assert "`switch-8` needs 1.60x fewer steps" in line and "(final loss 2.3000)" in line
    assert "`dense-seed1` 1.71x" in line


def test_one_dense_seed_or_no_switch_run_at_the_dense_loss_has_no_seed_line():
    assert verdict([DENSE_0, SWITCH]).against_seeds is None
    slow = synthetic_run("switch-2", RunKind.SWITCH, (4.5, 3.5, 3.0, 2.9), experts=2)
    check = verdict([DENSE_0, DENSE_1, slow])
    assert check.best_by_steps is None and check.against_seeds is None
    assert not any(line.startswith("- Against every dense seed") for line in check.lines())


def test_the_dense_seeds_throughput_spread_is_reported_as_timing_noise():
    fast = dataclasses.replace(DENSE_1, tokens_per_second=12_000.0)
    slow = dataclasses.replace(DENSE_0, tokens_per_second=9_600.0)
    lines = _machine_lines([slow, fast, SWITCH])
    assert lines == [
        "Timing noise: the dense seeds, identical in cost, ran at 9,600 / 12,000 tokens/s (1.25x apart): a time "
        "speedup closer to 1x than that is within the machine's timing noise.",
        "",
    ]
    assert _machine_lines([slow, SWITCH]) == []  # one dense seed: no estimate
    loaded = dataclasses.replace(slow, load_average=2.0)
    with_load = _machine_lines([loaded, fast])
    assert with_load[0].startswith("Machine load") and with_load[2:3] == [lines[0]]
    assert "each run): dense-seed0 2.00." in with_load[0]  # no core count recorded (earlier versions)
    recorded = _machine_lines([dataclasses.replace(loaded, cores=4), fast])[0]
    assert recorded.startswith("Machine load (5-minute load average at the end of each run; 4 cores): ")


def test_a_comparison_still_training_is_flagged_and_compared_at_its_last_common_evaluation():
    assert _progress_lines([DENSE_0, SWITCH]) == []  # both finished at step 400
    # read_results cuts every curve at the last common evaluation (300), while `steps` stays each run's progress.
    cut = [r.up_to(300) for r in (DENSE_0, SWITCH)]
    running = [cut[0], dataclasses.replace(cut[1], steps=350)]
    assert _progress_lines(running)[0] == (
        "**In progress** (dense-seed0 at step 400, switch-8 at step 350): losses and speedups are compared at "
        "step 300, the last step every run has evaluated; the speedup-by-step table and the loss and speedup plots "
        "show each run as far as it has trained."
    )
    header, _, dense_row, switch_row = table_lines(running, running[0])
    assert "| steps trained | final val loss |" in header
    assert "| 400 | 2.5000 |" in dense_row and "| 350 | 2.0000 |" in switch_row


def test_the_speedup_by_step_table_shows_each_run_as_far_as_it_has_trained():
    """A run added to a finished comparison (here stopped at 200 and at 300 of the reference's 400 steps) gets
    its speedups where they are known, and '-' where it has not trained far enough to know them."""
    short = SWITCH.up_to(200)
    longer = dataclasses.replace(SWITCH.up_to(300), name="switch-32")
    lines = growth_lines([DENSE_0, short, longer], DENSE_0)
    assert lines[4] == "| run | N = 100 | N = 200 | N = 300 | N = 400 |"
    # N = 200: dense is at 3.0, which Switch crosses at 100 + 0.8/1.2 * 100 steps. N = 300 (dense 2.5): at
    # 200 + 0.1/0.6 * 100, past the short run's end. N = 400 (dense 2.2): at 200 + 0.4/0.6 * 100, which the run
    # stopped at 300 has reached.
    assert lines[6] == f"| switch-8 | 1.00x | {200 / (100 + 80 / 1.2):.2f}x | - | - |"
    assert lines[7] == (
        f"| switch-32 | 1.00x | {200 / (100 + 80 / 1.2):.2f}x | {300 / (200 + 10 / 0.6):.2f}x "
        f"| {400 / (200 + 40 / 0.6):.2f}x |"
    )
    slow = synthetic_run("switch-2", RunKind.SWITCH, (4.5, 3.5, 3.0, 2.9), experts=2)
    assert growth_lines([DENSE_0, slow], DENSE_0)[6].endswith("| n/a | n/a |")  # trained, never got there: n/a

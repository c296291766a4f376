"""Speedup arithmetic on synthetic curves, with every expected value worked by hand."""

from __future__ import annotations

import math

import pytest

from switchformer.experiments.speedup import (
    Curve,
    first_crossing,
    mean_curve,
    milestones,
    monotone_within,
    seed_noise,
    speedup_curve,
    step_speedup_at,
    time_to_target,
)

DENSE = Curve(steps=(100, 200, 300, 400), seconds=(10, 20, 30, 40), losses=(4.0, 3.0, 2.5, 2.2))
SWITCH = Curve(steps=(100, 200, 300, 400), seconds=(12, 24, 36, 48), losses=(3.8, 2.6, 2.0, 1.8))


def test_crossing_is_interpolated_between_the_evaluations_around_it():
    # 2.6 at step 200, 2.0 at step 300: 2.2 is 0.4/0.6 of the way, step 266.67; seconds 24 + 0.4/0.6 * 12 = 32.
    assert first_crossing(SWITCH.steps, SWITCH.losses, 2.2) == pytest.approx(200 + 400 / 6)
    assert first_crossing(SWITCH.seconds, SWITCH.losses, 2.2) == pytest.approx(32.0)
    # The dense curve first reaches its own final loss at its final evaluation.
    assert first_crossing(DENSE.steps, DENSE.losses, DENSE.final_loss) == 400


def test_speedup_is_the_reference_steps_and_seconds_over_the_runs():
    result = time_to_target(SWITCH, DENSE.final_loss, DENSE)
    assert result.steps == pytest.approx(266.6667, rel=1e-5)
    assert result.step_speedup == pytest.approx(1.5)  # 400 / 266.67
    assert result.time_speedup == pytest.approx(1.25)  # 40 s / 32 s: slower steps eat part of the gain
    same = time_to_target(DENSE, DENSE.final_loss, DENSE)
    assert (same.step_speedup, same.time_speedup) == (1.0, 1.0)


def test_a_curve_that_never_gets_there_has_no_speedup():
    slow = Curve(steps=(100, 200, 300, 400), seconds=(9, 18, 27, 36), losses=(3.9, 3.0, 2.5, 2.3))
    result = time_to_target(slow, DENSE.final_loss, DENSE)
    assert result.steps is None and result.seconds is None
    assert result.step_speedup is None and result.time_speedup is None


def test_edge_cases_first_point_already_below_non_monotone_and_empty():
    assert first_crossing((100, 200), (1.0, 0.5), 5.0) == 100  # nothing is known before the first evaluation
    # 3.0 -> 2.0 crosses 2.2 at 100 + 0.8 * 100 = 180; the later bump to 2.5 does not matter.
    assert first_crossing((100, 200, 300, 400), (3.0, 2.0, 2.5, 1.5), 2.2) == pytest.approx(180.0)
    assert first_crossing((), (), 1.0) is None
    assert math.isnan(Curve((), (), ()).final_loss)
    with pytest.raises(ValueError, match="as many"):
        Curve((1,), (), (1.0,))


def test_seed_noise_and_monotone_within_noise():
    assert seed_noise([2.0, 2.1]) == pytest.approx(0.1 / math.sqrt(2))  # sample std of two values
    assert seed_noise([2.0]) is None
    assert monotone_within([2.2, 2.1, 2.15, 2.0], tolerance=0.06)  # the 0.05 bump is within tolerance
    assert not monotone_within([2.2, 2.1, 2.15, 2.0], tolerance=0.04)


def test_step_speedup_at_each_point_of_training():
    # Stopped at 200, dense is at 3.0; Switch gets there between 100 (3.8) and 200 (2.6): 100 + 0.8/1.2 * 100.
    assert step_speedup_at(SWITCH, DENSE, 200) == pytest.approx(200 / (100 + 80 / 1.2))
    # Stopped at 300 (dense 2.5): Switch crosses between 200 (2.6) and 300 (2.0) at 200 + 0.1/0.6 * 100.
    assert step_speedup_at(SWITCH, DENSE, 300) == pytest.approx(300 / (200 + 100 / 6))
    # At 400 it is the final-loss speedup of the main table.
    assert step_speedup_at(SWITCH, DENSE, 400) == pytest.approx(time_to_target(SWITCH, 2.2, DENSE).step_speedup)
    # Between evaluations the reference's loss is interpolated: at 250 dense is at 2.75, which dense reaches at
    # step 250 and Switch at 100 + 1.05/1.2 * 100 = 187.5.
    assert step_speedup_at(SWITCH, DENSE, 250) == pytest.approx(250 / 187.5)
    assert step_speedup_at(DENSE, DENSE, 300) == pytest.approx(1.0)
    assert step_speedup_at(SWITCH, DENSE, 500) is None  # past the reference's last evaluation
    assert step_speedup_at(SWITCH, DENSE, 50) is None
    slow = Curve(steps=(100, 200), seconds=(1, 2), losses=(4.5, 3.5))
    assert step_speedup_at(slow, DENSE, 300) is None  # never reaches 2.5


def test_speedup_curve_is_the_step_speedup_at_every_reference_evaluation():
    # At 100 both first evaluations are known only from there on: Switch's 3.8 is already below dense's 4.0, so 1x.
    expected = [(100, 1.0)] + [(n, step_speedup_at(SWITCH, DENSE, n)) for n in (200, 300, 400)]
    curve = speedup_curve(SWITCH, DENSE)
    assert [n for n, _ in curve] == [n for n, _ in expected]
    assert [s for _, s in curve] == pytest.approx([s for _, s in expected])
    assert speedup_curve(SWITCH, DENSE)[1][1] == pytest.approx(200 / (100 + 80 / 1.2))
    # A slower run that never reaches dense's 2.2 has no point at 400; at 100 it needs 100 + 0.2/0.8 * 100 steps.
    slower = Curve(steps=(100, 200, 300), seconds=(1, 2, 3), losses=(4.2, 3.4, 2.5))
    assert [n for n, _ in speedup_curve(slower, DENSE)] == [100, 200, 300]
    assert speedup_curve(slower, DENSE)[0][1] == pytest.approx(100 / 125)


def test_milestones_spread_over_the_evaluations():
    evaluations = list(range(100, 1600, 100))
    assert milestones(evaluations, 3) == [500, 1000, 1500]
    assert milestones(evaluations, 6) == [200, 500, 700, 1000, 1200, 1500]  # nearest evaluation to 250, 750, ...
    assert milestones([100, 200], 6) == [100, 200]  # no more columns than evaluations
    assert milestones([], 3) == [] and milestones(evaluations, 0) == []


def test_mean_curve_averages_the_seeds_at_their_shared_evaluations():
    other = Curve(steps=(100, 200, 300, 400, 500), seconds=(14, 26, 38, 50, 62), losses=(4.4, 3.2, 2.7, 2.4, 2.3))
    mean = mean_curve([DENSE, other])
    assert mean.steps == (100, 200, 300, 400)  # 500 only in one curve
    assert mean.seconds == pytest.approx((12, 23, 34, 45))
    assert mean.losses == pytest.approx((4.2, 3.1, 2.6, 2.3))
    # Switch (1.8 at 400) reaches the mean's 2.3 between 200 (2.6) and 300 (2.0): 200 + 0.3/0.6 * 100 = 250 steps,
    # 24 + 0.5 * 12 = 30 s; the mean curve needs 400 steps and 45 s.
    t = time_to_target(SWITCH, mean.final_loss, mean)
    assert t.step_speedup == pytest.approx(400 / 250) and t.time_speedup == pytest.approx(45 / 30)
    assert mean_curve([DENSE]) == DENSE
    assert mean_curve([]) is None
    assert mean_curve([DENSE, Curve(steps=(150,), seconds=(1,), losses=(3.0,))]) is None  # nothing shared

"""Speedup arithmetic: when does a validation-loss curve first reach a target, and how much sooner than dense.

The paper's headline (Figure 5/6, Table 1) is time to quality: the steps, or seconds, a model needs to reach the
dense baseline's final validation loss. Evaluations are sparse (every ``eval_every`` steps), so the crossing is
found by linear interpolation between the two evaluations around it. Pure functions, tested by hand.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Curve:
    """Validation loss at each evaluation, with the step and training seconds (evaluation excluded) it came at."""

    steps: tuple[float, ...]
    seconds: tuple[float, ...]
    losses: tuple[float, ...]

    def __post_init__(self) -> None:
        if not (len(self.steps) == len(self.seconds) == len(self.losses)):
            raise ValueError("a Curve needs as many steps and seconds as losses")

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan


def mean_curve(curves: Sequence[Curve]) -> Curve | None:
    """The mean of several runs' curves (e.g. dense seeds) at the steps all of them evaluated: a steadier reference
    than any one seed. Seconds are averaged too, so time to quality stays in the same units. None without a shared
    evaluation."""
    if not curves:
        return None
    shared = set(curves[0].steps).intersection(*(c.steps for c in curves[1:]))
    steps = tuple(sorted(shared))
    if not steps:
        return None
    at = [dict(zip(c.steps, zip(c.seconds, c.losses, strict=True), strict=True)) for c in curves]
    seconds = tuple(statistics.fmean(point[s][0] for point in at) for s in steps)
    losses = tuple(statistics.fmean(point[s][1] for point in at) for s in steps)
    return Curve(steps, seconds, losses)


def first_crossing(xs: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """The first ``x`` at which the piecewise-linear curve through ``(xs, losses)`` is at or below ``target``.

    ``None`` if it never gets there. If the very first evaluation is already at or below ``target`` its ``x`` is
    returned (nothing is known before it).
    """
    if not xs:
        return None
    if losses[0] <= target:
        return float(xs[0])
    for (x0, l0), (x1, l1) in itertools.pairwise(zip(xs, losses, strict=True)):
        if l1 <= target < l0:
            return x0 + (l0 - target) / (l0 - l1) * (x1 - x0)
    return None


@dataclasses.dataclass(frozen=True)
class TimeToTarget:
    """Steps and seconds a curve needs to reach a target loss, and the speedups over the reference's."""

    steps: float | None  # None: never reached
    seconds: float | None
    step_speedup: float | None  # reference steps / these steps (> 1: fewer steps than the reference)
    time_speedup: float | None


def time_to_target(curve: Curve, target: float, reference: Curve) -> TimeToTarget:
    """How soon ``curve`` reaches ``target`` (usually the reference's final loss), and how much sooner than it."""
    steps = first_crossing(curve.steps, curve.losses, target)
    seconds = first_crossing(curve.seconds, curve.losses, target)
    ref_steps = first_crossing(reference.steps, reference.losses, target)
    ref_seconds = first_crossing(reference.seconds, reference.losses, target)
    return TimeToTarget(steps, seconds, _ratio(ref_steps, steps), _ratio(ref_seconds, seconds))


def step_speedup_at(curve: Curve, reference: Curve, step: float) -> float | None:
    """The step speedup had both runs stopped at ``step``: the reference's steps to its loss at ``step`` (read off
    its curve by interpolation) over ``curve``'s steps to that loss. Tracks how the sparse lead grows with training;
    ``None`` if ``step`` is outside the reference's curve or ``curve`` never gets there."""
    ref_steps, ref_losses = reference.steps, reference.losses
    if not ref_steps or not ref_steps[0] <= step <= ref_steps[-1]:
        return None
    target = float(np.interp(step, ref_steps, ref_losses))
    return _ratio(first_crossing(ref_steps, ref_losses, target), first_crossing(curve.steps, curve.losses, target))


def speedup_curve(curve: Curve, reference: Curve) -> list[tuple[float, float]]:
    """``step_speedup_at`` at each of the reference's evaluations, as (step, speedup) pairs; steps where it is
    undefined (``curve`` never reaches the reference's loss there) are left out."""
    points = ((step, step_speedup_at(curve, reference, step)) for step in reference.steps)
    return [(step, speedup) for step, speedup in points if speedup is not None]


def milestones(steps: Sequence[float], count: int) -> list[float]:
    """Up to ``count`` evaluation steps spread evenly over a run (the last one included), for a table of how a
    quantity develops: for evaluations at 100, 200, ... 1500 and ``count=3``, steps 500, 1000 and 1500."""
    if not steps or count < 1:
        return []
    last = steps[-1]
    picked = {min(steps, key=lambda s: abs(s - last * i / count)) for i in range(1, count + 1)}
    return sorted(picked)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def seed_noise(final_losses: Sequence[float]) -> float | None:
    """Run-to-run noise of a final loss: the sample standard deviation over seeds (None with fewer than two)."""
    return statistics.stdev(final_losses) if len(final_losses) >= 2 else None


def monotone_within(values: Sequence[float], tolerance: float) -> bool:
    """True if no value is worse (higher) than the previous one by more than ``tolerance``."""
    return all(b <= a + tolerance for a, b in itertools.pairwise(values))

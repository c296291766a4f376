"""Train the runs of a :class:`ComparePlan`, ``parallel_runs`` at a time, each in its own folder under ``OUTPUT/runs/``
(the folder's layout: :mod:`.folder`).

Rerunning the same command skips finished runs and resumes unfinished ones from their last checkpoint, so an
interrupted comparison loses at most ``checkpoint_every`` steps of each run it was training, and a larger ``steps``
extends every run (the inverse-sqrt schedule does not depend on the total).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from switchformer.data import DataConfig, PreparedData, prepare_data
from switchformer.experiments.folder import DATA_DIR, MACHINE_FILE, PLAN_FILE, SPEC_FILE, load_plan, run_dir
from switchformer.experiments.plan import ComparePlan, RunSpec, plan_runs
from switchformer.experiments.side_by_side import (
    CallbackFactory,
    RunPlace,
    check_picklable,
    no_callbacks,
    train_side_by_side,
)
from switchformer.run_folder import atomic_write_json, finished_steps, latest_run_checkpoint
from switchformer.training.callbacks import Callback
from switchformer.training.pretrain import JobOptions, RunConfigs, train_prepared

logger = logging.getLogger(__name__)

# Plan fields a rerun may change without invalidating runs (how many train at once changes timings, not results).
_MAY_CHANGE = {"train.steps", "only", "train.checkpoint_every", "parallel_runs"}
# The fields that say which runs a folder holds, not how any run trains: a rerun naming other values adds runs
# (e.g. `--experts 128` on a finished comparison) and the folder's plan keeps the union, so no run is forgotten.
_SWEEP = ("dense_seeds", "expert_counts", "capacity_factors")


class RunStatus(enum.Enum):
    TRAINED = "trained"
    RESUMED = "resumed"
    SKIPPED = "skipped"  # already finished with at least the planned steps


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    spec: RunSpec
    status: RunStatus
    run_dir: Path


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config's fields by dotted path: ``{"model.moe.gate": ...}``."""
    flat: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{name}.")
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def check_plan(output: Path, plan: ComparePlan, data: DataConfig) -> None:
    """Refuse, before anything is written, a plan naming unknown runs (``only``) or one that differs from the plan
    an existing folder was made with."""
    plan_runs(plan, plan.data.vocab_size)  # run names do not depend on the vocabulary
    if not (Path(output) / PLAN_FILE).is_file():
        return
    saved_plan, saved_data = load_plan(output)
    may_change = _MAY_CHANGE | {f"sweep.{name}" for name in _SWEEP}
    now, then = _flat(plan.to_dict()), _flat(saved_plan.to_dict())
    changed = {name for name, value in now.items() if name not in may_change and then.get(name) != value}
    now, then = _flat(data.to_dict(), "data."), _flat(saved_data.to_dict(), "data.")
    changed |= {name for name, value in now.items() if then.get(name) != value}
    if changed:
        raise ValueError(
            f"{output} holds a comparison made with other settings ({', '.join(sorted(changed))} differ); rerun "
            "with the same settings to resume it, or choose a new --output"
        )


def write_or_check_plan(output: Path, plan: ComparePlan, data: DataConfig) -> None:
    """Record the plan in a new folder, or refuse to mix a different plan into an existing one; a plan that only
    adds runs is recorded with the union of both sweeps."""
    check_plan(output, plan, data)
    if (Path(output) / PLAN_FILE).is_file():
        saved = load_plan(output)[0].sweep
        union = {name: tuple(dict.fromkeys([*getattr(saved, name), *getattr(plan.sweep, name)])) for name in _SWEEP}
        plan = plan.replace(sweep=plan.sweep.replace(**union))
    atomic_write_json(Path(output) / PLAN_FILE, {"plan": plan.to_dict(), "data": data.to_dict()}, sort_keys=False)


def prepare_run_data(data: DataConfig, output: Path, seed: int) -> PreparedData:
    """A fresh batch stream for one run (streams are stateful), from the cache shared by all runs."""
    return prepare_data(data.replace(seed=seed), Path(output) / DATA_DIR)


def train_run(
    spec: RunSpec,
    plan: ComparePlan,
    data: DataConfig,
    output: Path,
    *,
    callbacks: Sequence[Callback] = (),
) -> RunOutcome:
    """Train (or resume, or skip) one run of the plan in ``output/runs/NAME``."""
    folder, steps = run_dir(output, spec.name), plan.train.steps
    if finished_steps(folder) >= steps:
        logger.info("%s: finished (%d steps), skipped", spec.name, finished_steps(folder))
        return RunOutcome(spec, RunStatus.SKIPPED, folder)
    resume = latest_run_checkpoint(folder) is not None
    atomic_write_json(folder / SPEC_FILE, spec.to_dict(), sort_keys=False)
    prepared = prepare_run_data(data, output, spec.seed)
    configs = RunConfigs(spec.model, plan.train_config(spec.seed), data.replace(seed=spec.seed))
    options = JobOptions(callbacks=callbacks, tensorboard=False)
    extra = {"compare_run": spec.to_dict()}
    trainer = train_prepared(configs, prepared, folder, resume=resume, options=options, extra_config=extra)
    logger.info("%s: %s at step %d of %d", spec.name, "resuming" if resume else "training", trainer.step, steps)
    started = os.getloadavg()
    trainer.train()
    machine = {
        "load_start": started,
        "load_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "runs_at_once": plan.parallel_runs,
    }
    atomic_write_json(folder / MACHINE_FILE, machine, sort_keys=False)
    return RunOutcome(spec, RunStatus.RESUMED if resume else RunStatus.TRAINED, folder)


def run_comparison(
    plan: ComparePlan, output: Path, data: DataConfig, *, callbacks: CallbackFactory = no_callbacks
) -> list[RunOutcome]:
    """Train every run of ``plan``, ``plan.parallel_runs`` at a time; finished runs are skipped, interrupted ones
    resumed. Outcomes come in the plan's order.

    ``callbacks(spec, place)`` gives each run's callbacks (see :class:`RunPlace`). With ``parallel_runs > 1``
    each run trains in a fresh spawned process (:mod:`.side_by_side`), so the factory must be picklable (a
    module-level function or class, not a lambda), and a script calling this needs the
    ``if __name__ == "__main__":`` guard, as any script using ``multiprocessing``'s spawn does.

    As each run ends it logs how many are done and, from the runs trained so far, about how long the rest will take.
    """
    output = Path(output)
    at_once, threads = plan.parallel_runs, plan.train.threads or 1
    if at_once > 1:
        check_picklable(callbacks)
    write_or_check_plan(output, plan, data)  # a bad plan fails before any work
    vocab = prepare_run_data(data, output, plan.train.seed).tokenizer.vocab_size
    specs = plan_runs(plan, vocab)
    cores = os.cpu_count() or 1
    if at_once * threads > cores:
        logger.warning(
            "compare: %d runs at a time x %d threads is more than this machine's %d cores; runs will slow each "
            "other down (--set parallel_runs=N --set threads=N)",
            at_once,
            threads,
            cores,
        )
    progress = _Progress(len(specs), at_once)

    def is_finished(spec: RunSpec) -> bool:
        return finished_steps(run_dir(output, spec.name)) >= plan.train.steps

    train = functools.partial(train_run, plan=plan, data=data, output=output)
    if at_once > 1:
        return train_side_by_side(specs, train, at_once, callbacks, is_finished=is_finished, on_run_end=progress.ended)
    outcomes = []
    for index, spec in enumerate(specs, 1):
        started = time.monotonic()
        outcomes.append(train(spec, callbacks=callbacks(spec, RunPlace(index, len(specs)))))
        progress.ended(outcomes[-1], time.monotonic() - started, sum(not is_finished(s) for s in specs[index:]))
    return outcomes


class _Progress:
    """Counts the runs that ended and logs the count with an estimate of the time left."""

    def __init__(self, total: int, at_once: int) -> None:
        self.total, self.at_once = total, at_once
        self.count = 0
        self.spent: list[float] = []  # wall-clock seconds of each run trained (not skipped) in this call

    def ended(self, outcome: RunOutcome, seconds: float, left: int) -> None:
        """After a run ended; ``left``: the runs not yet ended that may need training."""
        self.count += 1
        if outcome.status is not RunStatus.SKIPPED:
            self.spent.append(seconds)
        time_left = _time_left_text(self.spent, left, self.at_once)
        logger.info("compare: %d of %d runs done%s", self.count, self.total, time_left)


def _time_left_text(spent: Sequence[float], unfinished: int, at_once: int = 1) -> str:
    """``"; about 1 h 4 min to go (8 min a run so far)"``: the median run so far times the runs left to train,
    shared among the runs trained at once (``at_once``)."""
    if not unfinished or not spent:
        return ""
    per_run = statistics.median(spent)
    rounds = math.ceil(unfinished / at_once)
    return f"; about {_duration(rounds * per_run)} to go ({_duration(per_run)} a run so far)"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"

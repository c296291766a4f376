"""Train the runs of a :class:`ComparePlan`, ``parallel_runs`` at a time, each in its own folder under ``OUTPUT/runs/``.

Folder layout::

    OUTPUT/compare.json          the plan and data config (a rerun must match them, but for steps, `only` and the
                                 runs it adds: its sweep is the union of every command's)
    OUTPUT/data/                 tokenizer and token arrays, shared by all runs (prepared once, then cached)
    OUTPUT/runs/NAME/            spec.json, metrics.jsonl, summary.json, checkpoints/ (one Trainer run each)

Rerunning the same command skips finished runs and resumes unfinished ones from their last checkpoint, so an
interrupted comparison loses at most ``checkpoint_every`` steps of each run it was training, and a larger ``steps``
extends every run (the inverse-sqrt schedule does not depend on the total).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from switchformer.data import DataConfig, Objective, PreparedData, prepare_data
from switchformer.experiments.plan import ComparePlan, RunSpec, plan_runs
from switchformer.experiments.side_by_side import (
    CallbackFactory,
    RunPlace,
    check_picklable,
    no_callbacks,
    train_side_by_side,
)
from switchformer.moe.config import Gate
from switchformer.run_folder import atomic_write_json, finished_steps, latest_run_checkpoint
from switchformer.training.callbacks import Callback
from switchformer.training.pretrain import JobOptions, RunConfigs, train_prepared

logger = logging.getLogger(__name__)

PLAN_FILE = "compare.json"
SPEC_FILE = "spec.json"
MACHINE_FILE = "machine.json"  # load averages when a run started and ended, runs trained at once: timings need both
# What a plan saved before these ComparePlan fields existed ran: the paper's gate, MoEConfig's 1024-token groups.
_BEFORE_THE_FIELD = {"gate": Gate.PROBABILITY.value, "group_size": 1024, "z_loss_coef": 0.0, "parallel_runs": 1}
# Plan fields a rerun may change without invalidating runs (how many train at once changes timings, not results).
_MAY_CHANGE = {"steps", "only", "checkpoint_every", "parallel_runs"}
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


def data_config_for(plan: ComparePlan, source: str | None = None, text_field: str = "text") -> DataConfig:
    """The data every run reads: the plan's tokenizer, sequence length and batch, the objective of its architecture."""
    objective = Objective.SPAN_CORRUPTION if plan.architecture.value == "encoder-decoder" else Objective.CAUSAL_LM
    return DataConfig(
        source=source, text_field=text_field, objective=objective, sequence_length=plan.sequence_length,
        batch_size=plan.batch_size, vocab_size=plan.vocab_size, validation_batches=plan.validation_batches,
        seed=plan.seed,
    )  # fmt: skip


def run_dir(output: Path, name: str) -> Path:
    return Path(output) / "runs" / name


def _plan_record(plan: ComparePlan, data: DataConfig) -> dict[str, Any]:
    """What ``compare.json`` holds: the plan and the data config."""
    return {"plan": plan.to_dict(), "data": data.to_dict()}


def check_plan(output: Path, plan: ComparePlan, data: DataConfig) -> None:
    """Refuse, before anything is written, a plan naming unknown runs (``only``) or one that differs from the plan
    an existing folder was made with."""
    plan_runs(plan, plan.vocab_size)  # run names do not depend on the vocabulary
    path = Path(output) / PLAN_FILE
    current = _plan_record(plan, data)
    if path.is_file():
        saved = _read_saved_plan(path)
        plan_now, plan_then = current["plan"], saved["plan"]
        fixed = (k for k in plan_now if k not in _MAY_CHANGE and k not in _SWEEP)
        changed = sorted(k for k in fixed if plan_then.get(k) != plan_now[k])
        changed += sorted(f"data.{k}" for k in current["data"] if saved["data"].get(k) != current["data"][k])
        if changed:
            raise ValueError(
                f"{output} holds a comparison made with other settings ({', '.join(changed)} differ); rerun with "
                "the same settings to resume it, or choose a new --output"
            )


def write_or_check_plan(output: Path, plan: ComparePlan, data: DataConfig) -> None:
    """Record the plan in a new folder, or refuse to mix a different plan into an existing one; a plan that only
    adds runs is recorded with the union of both sweeps."""
    check_plan(output, plan, data)
    path = Path(output) / PLAN_FILE
    record = _plan_record(plan, data)
    if path.is_file():
        saved = _read_saved_plan(path)["plan"]
        for name in _SWEEP:
            record["plan"][name] = list(dict.fromkeys([*saved[name], *record["plan"][name]]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def load_plan(output: Path) -> tuple[ComparePlan, DataConfig]:
    """The plan and data config a comparison folder was made with."""
    path = Path(output) / PLAN_FILE
    if not path.is_file():
        raise ValueError(f"{output} is not a comparison folder (no {PLAN_FILE}); run `switchformer compare` first")
    saved = _read_saved_plan(path)
    return ComparePlan.from_dict(saved["plan"]), DataConfig.from_dict(saved["data"])


def _read_saved_plan(path: Path) -> dict[str, Any]:
    """A folder's ``compare.json``, completed with the values that plans saved before a field existed ran with."""
    saved = json.loads(path.read_text())
    for name, value in _BEFORE_THE_FIELD.items():
        saved["plan"].setdefault(name, value)
    return saved


def prepare_run_data(data: DataConfig, output: Path, seed: int) -> PreparedData:
    """A fresh batch stream for one run (streams are stateful), from the cache shared by all runs."""
    return prepare_data(data.replace(seed=seed), Path(output) / "data")


def train_run(
    spec: RunSpec,
    plan: ComparePlan,
    data: DataConfig,
    output: Path,
    *,
    callbacks: Sequence[Callback] = (),
) -> RunOutcome:
    """Train (or resume, or skip) one run of the plan in ``output/runs/NAME``."""
    folder = run_dir(output, spec.name)
    if finished_steps(folder) >= plan.steps:
        logger.info("%s: finished (%d steps), skipped", spec.name, finished_steps(folder))
        return RunOutcome(spec, RunStatus.SKIPPED, folder)
    resume = latest_run_checkpoint(folder) is not None
    atomic_write_json(folder / SPEC_FILE, spec.to_dict(), sort_keys=False)
    prepared = prepare_run_data(data, output, spec.seed)
    configs = RunConfigs(spec.model, plan.train_config(spec.seed), data.replace(seed=spec.seed))
    trainer = train_prepared(configs, prepared, folder, resume=resume,
                             options=JobOptions(callbacks=callbacks, tensorboard=False),
                             extra_config={"compare_run": spec.to_dict()})  # fmt: skip
    logger.info("%s: %s at step %d of %d", spec.name, "resuming" if resume else "training", trainer.step, plan.steps)
    started = os.getloadavg()
    trainer.train()
    machine = {"load_start": started, "load_end": os.getloadavg(), "runs_at_once": plan.parallel_runs}
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
    if plan.parallel_runs > 1:
        check_picklable(callbacks)
    write_or_check_plan(output, plan, data)  # a bad plan fails before any work
    vocab = prepare_run_data(data, output, plan.seed).tokenizer.vocab_size
    specs = plan_runs(plan, vocab)
    cores = os.cpu_count() or 1
    if plan.parallel_runs * plan.threads > cores:
        logger.warning(
            "compare: %d runs at a time x %d threads is more than this machine's %d cores; runs will slow each "
            "other down (--set parallel_runs=N --set threads=N)", plan.parallel_runs, plan.threads, cores,
        )  # fmt: skip
    progress = _Progress(plan, len(specs))

    def is_finished(spec: RunSpec) -> bool:
        return finished_steps(run_dir(output, spec.name)) >= plan.steps

    train = functools.partial(train_run, plan=plan, data=data, output=output)
    if plan.parallel_runs > 1:
        on_run_end = progress.run_ended
        return train_side_by_side(
            specs, train, plan.parallel_runs, callbacks, is_finished=is_finished, on_run_end=on_run_end
        )
    outcomes = []
    for index, spec in enumerate(specs, 1):
        started = time.monotonic()
        outcomes.append(train(spec, callbacks=callbacks(spec, RunPlace(index, len(specs)))))
        progress.run_ended(outcomes[-1], time.monotonic() - started, sum(not is_finished(s) for s in specs[index:]))
    return outcomes


class _Progress:
    """Counts the runs that ended and logs the count with an estimate of the time left."""

    def __init__(self, plan: ComparePlan, total: int) -> None:
        self.plan, self.total = plan, total
        self.ended = 0
        self.spent: list[float] = []  # wall-clock seconds of each run trained (not skipped) in this call

    def run_ended(self, outcome: RunOutcome, seconds: float, left: int) -> None:
        """After a run ended; ``left``: the runs not yet ended that may need training."""
        self.ended += 1
        if outcome.status is not RunStatus.SKIPPED:
            self.spent.append(seconds)
        logger.info(
            "compare: %d of %d runs done%s", self.ended, self.total,
            _time_left_text(self.spent, left, self.plan.parallel_runs),
        )  # fmt: skip


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

"""The comparison's optional distillation row: the best Switch run distilled into a dense student."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from switchformer.distill.config import DistillConfig
from switchformer.distill.run import DistillResult, distill
from switchformer.distill.student import student_config
from switchformer.experiments.folder import DISTILL_PREFIX, SPEC_FILE, RunKind, read_json, run_dir
from switchformer.experiments.results import RunResult, read_results
from switchformer.models.config import ModelConfig
from switchformer.run_folder import CONFIG_FILE, latest_run_checkpoint
from switchformer.training.callbacks import Callback

logger = logging.getLogger(__name__)


def best_teacher(results: Sequence[RunResult]) -> RunResult:
    """The top-1 Switch run with the lowest final validation loss (the fewest experts on a tie)."""
    switch = [r for r in results if r.kind is RunKind.SWITCH]
    if not switch:
        raise ValueError("--distill needs a trained Switch run to use as the teacher")
    return min(switch, key=lambda r: (r.final_loss, r.num_experts))


def distill_best(
    output: Path,
    config: DistillConfig,
    *,
    steps: int,
    train_overrides: Sequence[str] = (),
    callbacks: Sequence[Callback] = (),
    threads: int | None = None,
) -> DistillResult:
    """Distil the best Switch run of ``output`` for ``steps`` (the comparison's budget) into ``runs/distill-NAME``;
    ``train_overrides`` (``FIELD=VALUE``) change the student's training settings from the teacher's. ``threads``
    gives the student and its control that many torch threads unless the overrides name them; a student already
    begun keeps the count it began with (a resumed run must not change it, and the report must say what ran)."""
    teacher = best_teacher(read_results(output))
    name = DISTILL_PREFIX + teacher.name
    folder = run_dir(output, name)
    if threads is not None and "threads" not in {o.split("=", 1)[0].strip() for o in train_overrides}:
        train_overrides = [*train_overrides, f"threads={_threads_begun_with(folder) or threads}"]
    teacher_spec = read_json(teacher.folder / SPEC_FILE)
    assert teacher_spec is not None  # read_results reads only runs with a spec
    spec = {
        "name": name,
        "kind": RunKind.DISTILLED.value,
        "seed": teacher.seed,
        "num_experts": 1,
        "capacity_factor": None,
        "teacher": teacher.name,
        "model": student_config(ModelConfig.from_dict(teacher_spec["model"])).to_dict(),
    }
    logger.info("distilling %s into a dense student in %s", teacher.name, folder)
    return distill(
        teacher.folder, folder, config, steps=steps, train_overrides=train_overrides, callbacks=callbacks, spec=spec
    )


def _threads_begun_with(folder: Path) -> int | None:
    """The torch threads a distillation's student was trained with, None if it has no checkpoint yet."""
    begun = latest_run_checkpoint(folder)
    return None if begun is None else int(json.loads((begun / CONFIG_FILE).read_text())["train"]["threads"])

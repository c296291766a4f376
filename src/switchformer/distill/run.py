"""Distil a trained Switch checkpoint into its dense twin and measure how much of the sparse gain survives.

The student trains for the teacher's budget (same steps, batch, schedule and data) and is compared with a dense
model trained from scratch with that budget: ``retained = (dense - student) / (dense - teacher)``, the share of
the teacher's quality gain the student keeps (the paper kept about 30%, Table 6). For a teacher from a
``switchformer compare`` folder, that dense model is the comparison's own dense run; otherwise one is trained.

That share credits the student with everything its start gives it, including the teacher's training steps: at a
small budget, a student that inherits trained weights and trains as long again beats the from-scratch baseline
whatever the teacher's soft targets do. So a control is trained too (unless switched off): the same student init and
steps without the teacher (weight 0). ``(control - student) / (dense - teacher)`` is the share of the teacher's gain
that the soft targets themselves account for.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from switchformer.data import DataConfig, PreparedData
from switchformer.distill.config import DistillConfig
from switchformer.distill.student import init_student_from_teacher, student_config
from switchformer.distill.trainer import DistillationTrainer
from switchformer.models.base import SwitchModelBase
from switchformer.models.config import ModelConfig
from switchformer.models.factory import build_model
from switchformer.run_folder import atomic_write_json, finished_steps, latest_run_checkpoint, resolve_checkpoint
from switchformer.training.callbacks import Callback
from switchformer.training.checkpoint import load_checkpoint, load_model_state
from switchformer.training.config import TrainConfig
from switchformer.training.evaluation import evaluate_model
from switchformer.training.pretrain import JobOptions, RunConfigs, prepare_data_in_turn, train_prepared
from switchformer.training.strategy import SingleProcess

logger = logging.getLogger(__name__)

RESULT_FILE = "distill.json"
CONTROL_DIR = "no-teacher"  # the student trained without its teacher


@dataclasses.dataclass
class DistillResult:
    teacher: str  # checkpoint path
    baseline: str  # the dense model trained from scratch with the same budget (checkpoint path)
    steps: int
    teacher_loss: float
    student_loss: float
    dense_loss: float
    retained: float | None  # (dense - student) / (dense - teacher); None if the teacher is not better than dense
    teacher_weight: float
    student_init: str  # 'mean', 'expert:N' or 'random'
    control_loss: float | None = None  # same init and steps, teacher weight 0; None when not trained
    soft_target_share: float | None = None  # (control - student) / (dense - teacher)
    # Steps the teacher and the dense baseline trained; None in a result file that lacks them, where both are the
    # student's steps. A student may train for less than its teacher (--steps).
    teacher_steps: int | None = None
    baseline_steps: int | None = None
    # The student's (and its control's) training settings changed from the teacher's, as FIELD=VALUE; the
    # dense baseline keeps the teacher's, since it trains from scratch.
    student_overrides: list[str] = dataclasses.field(default_factory=list)

    @property
    def teacher_budget(self) -> int:
        """Steps the teacher trained."""
        return self.teacher_steps or self.steps

    @property
    def baseline_budget(self) -> int:
        """Steps the dense baseline trained."""
        return self.baseline_steps or self.steps

    def lines(self) -> list[str]:
        lines = [
            f"- Teacher `{self.teacher}` ({self.teacher_budget} steps): validation loss {self.teacher_loss:.4f}.",
            f"- Dense baseline trained from scratch for {self.baseline_budget} steps: {self.dense_loss:.4f}.",
            f"- Dense student distilled for {self.steps} steps (teacher weight {self.teacher_weight:g}, init "
            f"{self.student_init}{self.settings_note}): {self.student_loss:.4f}.",
            f"- Share of the teacher's gain kept by the student: **{format_share(self.retained)}** (paper: about 30%).",
        ]
        if self.control_loss is not None:
            lines += [
                f"- Control, the same student init and {self.steps} steps without the teacher (weight 0): "
                f"{self.control_loss:.4f}. Share of the teacher's gain due to its soft targets, (control - student) "
                f"/ (dense - teacher): **{format_share(self.soft_target_share)}**.",
            ]
            if self.student_init != "random":
                lines.append(
                    "- The student starts from the teacher's trained weights, so it has trained for the teacher's "
                    "steps plus its own; the control shows how much of its lead over the from-scratch baseline "
                    "that alone explains."
                )
        return lines

    @property
    def settings_note(self) -> str:
        """``; lr=..., ...`` when the student did not train with the teacher's settings, else nothing."""
        return f"; {', '.join(self.student_overrides)}" if self.student_overrides else ""


def format_share(share: float | None, decimals: int = 0) -> str:
    """A share of the teacher's gain as a percentage, or why there is none."""
    return f"{share:.{decimals}%}" if share is not None else "n/a (the teacher is not better than dense)"


def retained_share(dense: float, student: float, teacher: float) -> float | None:
    """``(dense - student) / (dense - teacher)``: 1 = the student is as good as the teacher, 0 = as the dense one."""
    gain = dense - teacher
    return (dense - student) / gain if gain > 0 else None


def soft_target_share(dense: float, teacher: float, control: float, student: float) -> float | None:
    """``(control - student) / (dense - teacher)``: the share the student keeps beyond what the control (weight
    transfer and extra steps, no teacher) keeps, i.e. what the teacher's probabilities add."""
    kept = retained_share(dense, student, teacher)
    return None if kept is None else kept - retained_share(dense, control, teacher)


@dataclasses.dataclass
class LoadedModel:
    path: Path
    model: SwitchModelBase
    model_config: ModelConfig
    train_config: TrainConfig
    data_config: DataConfig
    step: int


def load_trained(path: Path) -> LoadedModel:
    """A run folder's latest checkpoint (or a checkpoint folder) as a model with its configs."""
    checkpoint_path = resolve_checkpoint(path)
    checkpoint = load_checkpoint(checkpoint_path, with_optimizer=False)
    if "data" not in checkpoint.config:
        raise ValueError(f"{checkpoint_path} does not record its data config; distil a switchformer training run")
    model_config = ModelConfig.from_dict(checkpoint.config["model"])
    model = build_model(model_config)
    load_model_state(model, checkpoint.model_state, source=checkpoint_path)
    train_config = TrainConfig.from_dict(checkpoint.config["train"])
    data_config = DataConfig.from_dict(checkpoint.config["data"])
    return LoadedModel(checkpoint_path, model, model_config, train_config, data_config, checkpoint.step)


def data_cache_of(checkpoint: Path) -> Path | None:
    """Where the teacher's tokenizer and tokens are cached: its run folder (``train``) or the comparison's ``data/``."""
    run = checkpoint.parent.parent
    for candidate in (run, run.parent.parent / "data"):
        if any(candidate.glob("data-*/tokenizer.json")):
            return candidate
    return None


def comparison_baseline(teacher: Path, seed: int) -> Path | None:
    """The dense run with the teacher's seed, if the teacher belongs to a ``switchformer compare`` folder."""
    folder = teacher.parent.parent.parent / f"dense-seed{seed}"
    return folder if latest_run_checkpoint(folder) is not None else None


def distill(
    teacher_path: Path,
    output: Path,
    config: DistillConfig,
    *,
    steps: int | None = None,
    baseline: Path | None = None,
    control: bool = True,
    train_overrides: Sequence[str] = (),
    callbacks: Sequence[Callback] = (),
    spec: dict[str, object] | None = None,
    strategy: SingleProcess | None = None,
) -> DistillResult:
    """Distil the teacher into a dense student in ``output`` (resumable), then compare it with dense and teacher.

    ``baseline`` is a dense run folder trained with the same budget; without one (and outside a comparison
    folder) a dense model is trained from scratch in ``output/dense-baseline``. ``control`` also trains the same
    student without the teacher in ``output/no-teacher``. ``train_overrides`` (``FIELD=VALUE``, e.g. ``lr=2e-4``)
    change the teacher's training settings for the student and its control, which otherwise restart the teacher's
    schedule, warmup included: a student starting from trained weights may not want that. A ``seed=`` override
    also seeds the student's initialisation (what ``init=random`` starts from). ``spec`` is written as
    ``spec.json`` so a comparison report lists the student as a run.

    Under torchrun (``strategy``), every training here is data-parallel over the ranks, each rank holding the whole
    teacher; the main rank writes the files and measures the result, and every rank returns it.
    """
    strategy = strategy or SingleProcess()
    teacher = load_trained(Path(teacher_path))
    if teacher.model_config.moe is None:
        raise ValueError(f"{teacher.path} is a dense model; distillation needs a Switch (sparse) teacher")
    train_config = teacher.train_config.replace(steps=steps or teacher.step)
    if strategy.world_size > 1:
        train_config = train_config.replace(device=str(strategy.layout.device))
    student_train = train_config.with_overrides(train_overrides)
    if student_train.steps != train_config.steps:
        raise ValueError("the student's steps are set with --steps, not with a steps= training override")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if spec is not None and strategy.is_main:
        atomic_write_json(output / "spec.json", spec, sort_keys=False)
    cache = data_cache_of(teacher.path) or output
    data = prepare_data_in_turn(teacher.data_config, cache, strategy)

    student_model_config = student_config(teacher.model_config)
    student_configs = RunConfigs(student_model_config, student_train, teacher.data_config)  # the control's too
    initial_student = functools.partial(
        _initial_student, student_model_config, student_train.seed, teacher.model, config
    )
    options = JobOptions(callbacks=callbacks, strategy=strategy, tensorboard=False)
    if finished_steps(output) < train_config.steps:
        # a resumed run loads its checkpoint over the initial student
        resume = latest_run_checkpoint(output) is not None
        train_prepared(
            student_configs,
            data,
            output,
            resume=resume,
            options=options,
            model=initial_student(),
            extra_config={"distill": config.to_dict(), "teacher": str(teacher.path)},
            trainer_class=DistillationTrainer,
            teacher=teacher.model,
            teacher_weight=config.teacher_weight,
        ).train()
        strategy.barrier()  # the main rank's last checkpoint and summary are written before anyone reads them
    baseline_path = baseline or comparison_baseline(teacher.path, train_config.seed)
    if baseline_path is None:
        dense_configs = RunConfigs(student_model_config, train_config, teacher.data_config)
        baseline_path = _train_dense(dense_configs, cache, output / "dense-baseline", options)
    paths = {"teacher": teacher.path, "student": output, "dense": Path(baseline_path)}
    if control and config.init_from_teacher:  # a random-init control would be the baseline again
        paths["control"] = _train_dense(student_configs, cache, output / CONTROL_DIR, options, initial=initial_student)
    if not strategy.is_main:
        strategy.barrier()  # the main rank measures and writes the result
        result = read_result(output)
        assert result is not None, f"{output / RESULT_FILE} was not written by the main rank"
        return result
    paths = {name: resolve_checkpoint(path) for name, path in paths.items()}
    trained = {name: load_trained(path) for name, path in paths.items()}
    losses = {name: _validation_loss(loaded.model, data) for name, loaded in trained.items()}
    dense_loss, teacher_loss, student_loss = losses["dense"], losses["teacher"], losses["student"]
    control_loss = losses.get("control")
    soft_share = None
    if control_loss is not None:
        soft_share = soft_target_share(dense_loss, teacher_loss, control_loss, student_loss)
    result = DistillResult(
        teacher=str(teacher.path),
        baseline=str(resolve_checkpoint(baseline_path)),
        steps=train_config.steps,
        teacher_loss=teacher_loss,
        student_loss=student_loss,
        dense_loss=dense_loss,
        retained=retained_share(dense_loss, student_loss, teacher_loss),
        teacher_weight=config.teacher_weight,
        student_init=config.describe_init(),
        control_loss=control_loss,
        soft_target_share=soft_share,
        teacher_steps=trained["teacher"].step,
        baseline_steps=trained["dense"].step,
        student_overrides=list(train_overrides),
    )
    atomic_write_json(output / RESULT_FILE, dataclasses.asdict(result), sort_keys=False)
    strategy.barrier()
    return result


def _initial_student(
    model_config: ModelConfig, seed: int, teacher: SwitchModelBase, config: DistillConfig
) -> SwitchModelBase:
    """The student before training: seeded random init, then the teacher's weights unless ``init`` is random."""
    torch.manual_seed(seed)
    student = build_model(model_config)
    if config.init_from_teacher:
        init_student_from_teacher(student, teacher, config.expert_init, config.expert_index)
    return student


def _train_dense(
    configs: RunConfigs,
    cache: Path,
    folder: Path,
    options: JobOptions,
    initial: Callable[[], SwitchModelBase] | None = None,
) -> Path:
    """A dense model with the student's budget and plain cross-entropy, from scratch or from the model ``initial``
    builds (skipped if already trained in ``folder``; resumed if interrupted). Fresh data: the student's batches
    in order."""
    if finished_steps(folder) < configs.train.steps:
        data = prepare_data_in_turn(configs.data, cache, options.strategy)
        model = initial() if initial is not None else None
        resume = latest_run_checkpoint(folder) is not None
        train_prepared(configs, data, folder, resume=resume, options=options, model=model).train()
        (options.strategy or SingleProcess()).barrier()
    return folder


def _validation_loss(model: SwitchModelBase, data: PreparedData) -> float:
    return evaluate_model(model, data.validation, device=torch.device("cpu"))["val_loss"]


def read_result(folder: Path) -> DistillResult | None:
    path = Path(folder) / RESULT_FILE
    return DistillResult(**json.loads(path.read_text())) if path.is_file() else None

"""Distil a trained Switch checkpoint into its dense twin and measure how much of the sparse gain survives.

The student trains for the teacher's budget (same steps, batch, schedule and data) and is compared with a dense
model trained from scratch with that budget: ``retained = (dense - student) / (dense - teacher)``, the share of
the teacher's quality gain the student keeps (the paper kept about 30%, Table 6). For a teacher from a
``switchformer compare`` folder, that dense model is the comparison's own dense run; otherwise one is trained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from switchformer.data import DataConfig, PreparedData, prepare_data
from switchformer.distill.config import DistillConfig
from switchformer.distill.student import init_student_from_teacher, student_config
from switchformer.distill.trainer import DistillationTrainer
from switchformer.models.base import SwitchModelBase
from switchformer.models.config import ModelConfig
from switchformer.models.factory import build_model
from switchformer.training.callbacks import Callback
from switchformer.training.checkpoint import latest_checkpoint, load_checkpoint, load_model_state, resolve_checkpoint
from switchformer.training.config import TrainConfig
from switchformer.training.evaluation import evaluate_model
from switchformer.training.trainer import Trainer

logger = logging.getLogger(__name__)

RESULT_FILE = "distill.json"


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

    def lines(self) -> list[str]:
        share = f"{self.retained:.0%}" if self.retained is not None else "n/a (the teacher is not better than dense)"
        return [
            f"- Teacher `{self.teacher}`: validation loss {self.teacher_loss:.4f}.",
            f"- Dense baseline trained from scratch for {self.steps} steps: {self.dense_loss:.4f}.",
            f"- Dense student distilled for {self.steps} steps (teacher weight {self.teacher_weight:g}, init "
            f"{self.student_init}): {self.student_loss:.4f}.",
            f"- Share of the teacher's gain kept by the student: **{share}** (paper: about 30%).",
        ]


def retained_share(dense: float, student: float, teacher: float) -> float | None:
    """``(dense - student) / (dense - teacher)``: 1 = the student is as good as the teacher, 0 = as the dense one."""
    gain = dense - teacher
    return (dense - student) / gain if gain > 0 else None


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
    return LoadedModel(checkpoint_path, model, model_config, TrainConfig.from_dict(checkpoint.config["train"]),
                       DataConfig.from_dict(checkpoint.config["data"]), checkpoint.step)  # fmt: skip


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
    return folder if latest_checkpoint(folder / "checkpoints") is not None else None


def distill(
    teacher_path: Path,
    output: Path,
    config: DistillConfig,
    *,
    steps: int | None = None,
    baseline: Path | None = None,
    callbacks: Sequence[Callback] = (),
    spec: dict[str, object] | None = None,
) -> DistillResult:
    """Distil the teacher into a dense student in ``output`` (resumable), then compare it with dense and teacher.

    ``baseline`` is a dense run folder trained with the same budget; without one (and outside a comparison
    folder) a dense model is trained from scratch in ``output/dense-baseline``. ``spec`` is written as
    ``spec.json`` so a comparison report lists the student as a run.
    """
    teacher = load_trained(Path(teacher_path))
    if teacher.model_config.moe is None:
        raise ValueError(f"{teacher.path} is a dense model; distillation needs a Switch (sparse) teacher")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if spec is not None:
        (output / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    train_config = teacher.train_config.replace(steps=steps or teacher.step)
    cache = data_cache_of(teacher.path) or output
    data = prepare_data(teacher.data_config, cache)

    student_model_config = student_config(teacher.model_config)
    resume = latest_checkpoint(output / "checkpoints") is not None
    torch.manual_seed(train_config.seed)
    student = build_model(student_model_config)
    if config.init_from_teacher and not resume:
        init_student_from_teacher(student, teacher.model, config.expert_init, config.expert_index)
    if not _finished(output, train_config.steps):
        extra = {"data": teacher.data_config.to_dict(), "distill": config.to_dict(), "teacher": str(teacher.path)}
        DistillationTrainer(
            student_model_config, train_config, train_batches=data.train, validation=data.validation, run_dir=output,
            extra_config=extra, callbacks=callbacks, resume=resume, model=student, tensorboard=False,
            teacher=teacher.model, teacher_weight=config.teacher_weight,
        ).train()  # fmt: skip
    student_path = resolve_checkpoint(output)
    baseline_path = baseline or comparison_baseline(teacher.path, train_config.seed)
    if baseline_path is None:
        baseline_path = _train_baseline(student_model_config, train_config, teacher.data_config, cache,
                                        output / "dense-baseline", callbacks)  # fmt: skip
    paths = {"teacher": teacher.path, "student": student_path, "dense": resolve_checkpoint(baseline_path)}
    losses = {name: _validation_loss(path, data) for name, path in paths.items()}
    result = DistillResult(
        teacher=str(teacher.path), baseline=str(resolve_checkpoint(baseline_path)), steps=train_config.steps,
        teacher_loss=losses["teacher"], student_loss=losses["student"], dense_loss=losses["dense"],
        retained=retained_share(losses["dense"], losses["student"], losses["teacher"]),
        teacher_weight=config.teacher_weight, student_init=config.describe_init(),
    )  # fmt: skip
    (output / RESULT_FILE).write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    return result


def _finished(folder: Path, steps: int) -> bool:
    summary = folder / "summary.json"
    return summary.is_file() and int(json.loads(summary.read_text())["steps"]) >= steps


def _train_baseline(
    model_config: ModelConfig, train_config: TrainConfig, data_config: DataConfig, cache: Path, folder: Path,
    callbacks: Sequence[Callback],
) -> Path:  # fmt: skip
    """The dense model from scratch with the student's budget (skipped if already trained in ``folder``)."""
    if not _finished(folder, train_config.steps):
        data = prepare_data(data_config, cache)
        resume = latest_checkpoint(folder / "checkpoints") is not None
        Trainer(model_config, train_config, train_batches=data.train, validation=data.validation, run_dir=folder,
                extra_config={"data": data_config.to_dict()}, callbacks=callbacks, resume=resume,
                tensorboard=False).train()  # fmt: skip
    return folder


def _validation_loss(path: Path, data: PreparedData) -> float:
    loaded = load_trained(path)
    return evaluate_model(loaded.model, data.validation, device=torch.device("cpu"))["val_loss"]


def read_result(folder: Path) -> DistillResult | None:
    path = Path(folder) / RESULT_FILE
    return DistillResult(**json.loads(path.read_text())) if path.is_file() else None

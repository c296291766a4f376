"""``switchformer distill TEACHER``: distil a trained Switch model into its dense twin (paper, section 4.2).

The student has the teacher's shape without experts, starts from the teacher's non-expert weights (each Switch FFN
becomes the experts' mean, or one expert), and trains for the teacher's budget on 0.75 ground truth + 0.25 the
teacher's probabilities. It is compared with a dense model trained from scratch with the same budget: the
comparison's own dense run when the teacher comes from ``switchformer compare``, otherwise one trained here.
Launched by ``torchrun --nproc-per-node N -m switchformer distill ...``, every training is data-parallel over N ranks.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from switchformer.cli.common import add_override_argument, print_table, require_output_under_torchrun, torchrun_job
from switchformer.distill.config import DistillConfig
from switchformer.distill.run import distill, format_share
from switchformer.distill.student import ExpertInit
from switchformer.experiments.plots import distillation_plot
from switchformer.training.callbacks import ProgressBar


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("distill", help="distil a Switch checkpoint into a dense student", description=__doc__)
    parser.add_argument("teacher", type=Path, help="Switch run folder (its latest checkpoint) or checkpoint folder")
    parser.add_argument("--output", type=Path, help="student run folder (default runs/distill-TIMESTAMP); resumable")
    parser.add_argument("--steps", type=int, help="student steps (default: as many as the teacher trained)")
    parser.add_argument(
        "--teacher-weight",
        type=float,
        default=0.25,
        help="share of the loss against the teacher's probabilities (paper: 0.25)",
    )
    parser.add_argument(
        "--init",
        default="mean",
        help="student FFN init from each Switch layer: 'mean' of the experts, 'expert:N' (one expert), or 'random' "
        "(no weight transfer at all)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="dense run folder trained with the same budget (default: the comparison's dense run, else one is trained "
        "from scratch)",
    )
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="skip the control run (the same student trained without the teacher), which shows how much of the "
        "student's gain the teacher's soft targets account for",
    )
    student = parser.add_argument_group(
        "student training",
        "the student and its control train with the teacher's settings unless changed here; the dense baseline always "
        "keeps them (it trains from scratch)",
    )
    student.add_argument("--lr", type=float, help="peak learning rate (default: the teacher's)")
    student.add_argument(
        "--warmup-steps",
        type=int,
        help="warmup steps (default: the teacher's). The inverse-sqrt schedule with 0 decays from the first step; to "
        "hold --lr (e.g. the teacher's final rate) add --train-set schedule=constant",
    )
    add_override_argument(
        student,
        "--train-set",
        "train_overrides",
        "override any other TrainConfig field, e.g. --train-set schedule=constant",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.set_defaults(run=run)


def train_overrides(args: argparse.Namespace) -> list[str]:
    """``--lr`` and ``--warmup-steps`` as FIELD=VALUE overrides, ahead of any ``--train-set`` ones."""
    named = [f"lr={args.lr!r}"] if args.lr is not None else []  # repr: the float round-trips exactly
    named += [f"warmup_steps={args.warmup_steps}"] if args.warmup_steps is not None else []
    return named + list(args.train_overrides)


def parse_init(text: str, teacher_weight: float) -> DistillConfig:
    """``mean`` / ``expert:N`` / ``random`` -> a :class:`DistillConfig`."""
    if text == "mean":
        return DistillConfig(teacher_weight=teacher_weight, expert_init=ExpertInit.MEAN)
    if text == "random":
        return DistillConfig(teacher_weight=teacher_weight, init_from_teacher=False)
    index = text.removeprefix("expert:")
    if text.startswith("expert:") and index.isdigit():
        return DistillConfig(teacher_weight=teacher_weight, expert_init=ExpertInit.EXPERT, expert_index=int(index))
    raise ValueError(f"--init={text!r} is invalid: use 'mean', 'expert:N' (N = the expert to copy) or 'random'")


def run(args: argparse.Namespace) -> int:
    config = parse_init(args.init, args.teacher_weight)
    require_output_under_torchrun(args.output)
    with torchrun_job("distill") as strategy:
        output = args.output or Path("runs") / f"distill-{time.strftime('%Y%m%d-%H%M%S')}"
        callbacks = [] if args.no_progress else [ProgressBar(desc="student")]
        result = distill(
            args.teacher,
            output,
            config,
            steps=args.steps,
            baseline=args.baseline,
            control=not args.no_control,
            train_overrides=train_overrides(args),
            callbacks=callbacks,
            strategy=strategy,
        )
    if strategy is not None and not strategy.is_main:
        return 0  # the main rank reports
    rows = [
        ("teacher", result.teacher),
        ("dense baseline", result.baseline),
        ("steps: student / teacher / dense", f"{result.steps} / {result.teacher_budget} / {result.baseline_budget}"),
        ("teacher validation loss", f"{result.teacher_loss:.4f}"),
        ("dense from scratch", f"{result.dense_loss:.4f}"),
        ("distilled student", f"{result.student_loss:.4f}"),
        ("share of the teacher's gain kept", f"{format_share(result.retained, 1)} (paper: about 30%)"),
    ]
    if result.control_loss is not None:
        rows += [
            ("student without the teacher", f"{result.control_loss:.4f}"),
            ("share due to the soft targets", format_share(result.soft_target_share, 1)),
        ]
    plot = distillation_plot(output, result)
    if plot is not None:
        rows.append(("plot", str(plot)))
    print_table(f"switchformer distill -> {output}", rows)
    return 0

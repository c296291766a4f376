"""``switchformer compare``: train the FLOP-matched dense model and Switch variants on the same data, then report
time to quality (the paper's Table 1 and Figure 4 at CPU scale). With no arguments it runs the documented default
comparison on the built-in corpus (its cost: docs/experiments.md); rerunning it resumes or skips finished runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from switchformer.cli.common import print_table
from switchformer.cli.distill import parse_init
from switchformer.data import DataConfig
from switchformer.experiments.distillation import distill_best
from switchformer.experiments.folder import HEADER_FILE, PLAN_FILE, RUNS_DIR, load_plan, read_json
from switchformer.experiments.history import history_lines, recorded_session
from switchformer.experiments.plan import ComparePlan, RunSpec, data_config_for
from switchformer.experiments.report import write_report
from switchformer.experiments.runner import check_plan, run_comparison
from switchformer.experiments.side_by_side import RunPlace, no_callbacks
from switchformer.run_folder import atomic_write_json
from switchformer.training.callbacks import ProgressBar
from switchformer.training.cpu_features import cpu_has_native_bf16
from switchformer.training.trainer import autocast_dtype, resolve_device

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT = Path("runs/compare")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def register(sub: argparse._SubParsersAction) -> None:
    summary = "dense vs Switch vs top-2 on the same data: time-to-quality report"
    parser = sub.add_parser("compare", help=summary, description=__doc__)
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"comparison folder with one run folder per model (default {DEFAULT_OUTPUT}); rerunning with the same "
        "folder resumes",
    )
    parser.add_argument("--report", type=Path, help="where report.md and the plots go (default: the --output folder)")
    parser.add_argument("--data", help="text file, folder, .jsonl, .parquet or dataset (default: built-in corpus)")
    parser.add_argument("--text-field", help="field holding the text in .jsonl/.parquet/datasets (default: text)")
    parser.add_argument("--steps", type=int, help="optimizer steps of every run")
    parser.add_argument(
        "--experts",
        type=_ints,
        help="expert counts of the Switch sweep, e.g. 2,8,32; on an existing --output, new counts "
        "add runs (train just those with --only switch-128) and the folder keeps the others",
    )
    parser.add_argument("--capacity-factors", type=_floats, help="extra Switch runs at these capacity factors")
    parser.add_argument("--seeds", type=_ints, help="dense seeds (two or more estimate the run-to-run noise)")
    parser.add_argument("--no-top2", action="store_true", help="leave out the top-2 MoE baseline")
    parser.add_argument("--only", help="train only these runs, e.g. dense-seed0,switch-8 (others are left as they are)")
    settings = {"action": "append", "default": [], "metavar": "FIELD=VALUE"}  # repeatable
    set_help = (
        "override any ComparePlan field, e.g. --set model.d_model=256 --set train.lr=1e-3 (or by the names of "
        "earlier versions: --set d_model=256 --set lr=1e-3)"
    )
    parser.add_argument("--set", dest="overrides", help=set_help, **settings)
    parser.add_argument("--distill", action="store_true", help="also distil the best Switch run into a dense student")
    parser.add_argument("--distill-init", default="mean", help="student init: mean, expert:N or random")
    distill_help = (
        "the student's own training settings, e.g. --distill-set lr=5e-4 (default: the teacher's, schedule "
        "restarted, with the threads the runs shared), as switchformer distill --train-set"
    )
    parser.add_argument("--distill-set", dest="distill_overrides", help=distill_help, **settings)
    parser.add_argument("--replot", action="store_true", help="rewrite the report and plots from the run folders only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    parser.set_defaults(run=run)


def plan_from_args(args: argparse.Namespace, base: ComparePlan | None = None) -> ComparePlan:
    """The default plan (or a folder's saved one) with the flags and ``--set`` overrides applied."""
    plan = (base or ComparePlan()).with_overrides(args.overrides)
    changes: dict[str, object] = {}
    if args.steps is not None:
        changes["train.steps"] = args.steps
    if args.experts is not None:
        changes["sweep.expert_counts"] = args.experts
    if args.capacity_factors is not None:
        changes["sweep.capacity_factors"] = args.capacity_factors
    if args.seeds is not None:
        changes["sweep.dense_seeds"], changes["train.seed"] = args.seeds, args.seeds[0]
    if args.no_top2:
        changes["sweep.top2_experts"] = None
    changes["only"] = tuple(x.strip() for x in args.only.split(",") if x.strip()) if args.only else ()
    return plan.replace(**changes)


class RunProgressBars:
    """Each run's progress bar, named with its place in the plan; runs side by side draw on a line per slot.

    A class rather than a closure: side-by-side runs build their callbacks in their own process (pickled).
    """

    def __init__(self, leave: bool) -> None:
        self.leave = leave  # side by side, a finished run's bar is cleared for the next one in its slot

    def __call__(self, spec: RunSpec, place: RunPlace) -> list[ProgressBar]:
        return [ProgressBar(desc=f"{spec.name} [{place}]", leave=self.leave, position=place.slot)]


def student_threads(plan: ComparePlan) -> int | None:
    """Torch threads for the distillation's student and control, which train after the runs, one at a time: all
    the threads the side-by-side runs shared, up to the cores (the teacher's own count was one run's share); None
    (the teacher's) when runs trained one at a time. ``--distill-set threads=N`` overrides it."""
    if plan.parallel_runs == 1:
        return None
    return min((plan.train.threads or 1) * plan.parallel_runs, os.cpu_count() or 1)


def warn_if_bf16_is_emulated(plan: ComparePlan) -> None:
    """bf16 autocast pays on CPU only with bf16 instructions; elsewhere say how to get float32's speed back."""
    device = resolve_device(plan.train.device)  # what the trainer will run on and in
    bf16 = autocast_dtype(plan.train.precision, device) is torch.bfloat16
    if device.type == "cpu" and bf16 and not cpu_has_native_bf16():
        logger.warning(
            "this CPU lists no bf16 instructions (avx512_bf16, amx_bf16 or Arm bf16), so bf16 autocast may be "
            "slower than float32 here; add --set precision=fp32 for a float32 comparison"
        )


def _header(argv: list[str], load_before: tuple[float, float, float], plan: ComparePlan) -> list[str]:
    load_after = os.getloadavg()
    return [
        f"- Command: `switchformer {shlex.join(argv)}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; torch {torch.__version__}; Python {platform.python_version()}; "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), torch threads: {plan.train.threads} a run, "
        f"{plan.parallel_runs} run{'s' if plan.parallel_runs > 1 else ''} at a time",
        f"- Load average (1, 5, 15 min) at the start: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"at the end: {', '.join(f'{x:.2f}' for x in load_after)}",
    ]


def _summary_rows(plan: ComparePlan, data: DataConfig) -> list[tuple[str, str]]:
    """What the command is about to train, shown before it starts."""
    model, train = plan.model, plan.train
    shape = f"d_model {model.d_model}, d_ff {model.d_ff}, {model.num_layers} layers, vocab {data.vocab_size}"
    return [
        ("data", data.source or "built-in corpus (Python standard library)"),
        ("model", f"{model.architecture.value}, {shape}"),
        ("budget", f"{train.steps} steps x {data.batch_size} x {data.sequence_length} tokens, lr {train.lr:g}"),
        ("precision", f"{train.precision.value} on {train.device}"),
    ]


def run(args: argparse.Namespace) -> int:
    load_before = os.getloadavg()
    output: Path = args.output
    saved = args.replot or (output / PLAN_FILE).is_file()
    base, saved_data = load_plan(output) if saved else (None, None)  # --replot: the folder must exist
    plan = plan_from_args(args, base)
    data = saved_data or data_config_for(plan, args.data, args.text_field)
    if saved_data is not None and args.data is not None and args.data != saved_data.source:
        raise ValueError(f"{output} was made with --data {saved_data.source}; use a new --output for other data")
    distill = parse_init(args.distill_init, teacher_weight=0.25)

    def bars(name: str) -> list[ProgressBar]:
        return [] if args.no_progress else [ProgressBar(desc=name, leave=True)]

    run_bars = no_callbacks if args.no_progress else RunProgressBars(leave=plan.parallel_runs == 1)

    if not args.replot:
        print_table(f"switchformer compare -> {output}", _summary_rows(plan, data))
        warn_if_bf16_is_emulated(plan)
        check_plan(output, plan, data)  # a refused command is not a training session of the folder
        with recorded_session(output, f"switchformer {shlex.join(sys.argv[1:])}"):
            outcomes = run_comparison(plan, output, data, callbacks=run_bars)
            for outcome in outcomes:
                logger.info("%s: %s", outcome.spec.name, outcome.status.value)
            if args.distill:
                distill_best(
                    output,
                    distill,
                    steps=plan.train.steps,
                    train_overrides=args.distill_overrides,
                    callbacks=bars("distill"),
                    threads=student_threads(plan),
                )
        header = _header(sys.argv[1:], load_before, plan)
        atomic_write_json(output / HEADER_FILE, header)
        header += history_lines(output)
    else:
        header = (read_json(output / HEADER_FILE) or []) + history_lines(output)
        header.append(f"- Report re-plotted from the run folders on {time.strftime('%Y-%m-%d %H:%M %Z')}")
    report = write_report(output, report_dir=args.report or output, header=header)
    print_table("comparison report", [("report", str(report)), ("runs", str(output / RUNS_DIR))])
    return 0

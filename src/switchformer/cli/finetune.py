"""``switchformer finetune CHECKPOINT --train train.jsonl --validation val.jsonl``: text-to-text fine-tuning.

Rows are JSON objects with an input and a target text (``--input-field``/``--target-field``). Starts from a
switchformer checkpoint, a training run folder or a Hugging Face Switch folder, with its ``tokenizer.json`` (or
``--tokenizer``). Uses the paper's expert dropout (0.1 outside the experts, 0.4 inside), evaluates validation loss
and exact match, stops early when the metric stops improving and keeps the best model in OUTPUT/best.
Under ``torchrun`` the global batch is split over the ranks (``--output`` required), data-parallel, or with
``--expert-parallel N`` each Switch layer's experts sharded over groups of N ranks.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from switchformer.cli.common import (
    INTERVAL_FIELDS,
    STEP_FIELDS,
    TRAIN_FIELDS,
    add_override_argument,
    add_parallel_arguments,
    add_step_arguments,
    given_fields,
    parallel_dims,
    print_table,
    require_output_under_torchrun,
    torchrun_job,
)
from switchformer.finetune.config import BadRowPolicy, FinetuneConfig, Metric, WeightsDtype
from switchformer.finetune.run import FinetuneResult, finetune
from switchformer.training.callbacks import ProgressBar
from switchformer.training.checkpoint import latest_checkpoint, load_checkpoint
from switchformer.training.config import TrainConfig

DEFAULT_TRAIN = {
    "steps": 1000,
    "lr": 3e-4,
    "schedule": "constant",
    "warmup_steps": 10,
    "eval_every": 100,
    "log_every": 10,
    "checkpoint_every": 100,
    "keep_checkpoints": 1,
}
# FinetuneConfig fields set from the option of the same name (--max-input-length: max_input_length)
TASK_FIELDS = ("input_field", "target_field", "batch_size", "max_input_length", "max_target_length", "dtype")
DROPOUT_FIELDS = ("dropout", "expert_dropout")
EVALUATION_FIELDS = ("metric", "eval_examples")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("finetune", help="fine-tune a checkpoint on JSONL input/target pairs", description=__doc__)
    parser.add_argument("checkpoint", help="switchformer or Hugging Face checkpoint folder, or a training run folder")
    parser.add_argument("--train", type=Path, required=True, help="JSON-lines file of training pairs")
    parser.add_argument("--validation", type=Path, required=True, help="JSON-lines file of validation pairs")
    parser.add_argument("--tokenizer", help="tokenizer.json or SentencePiece .model (default: the checkpoint's)")
    parser.add_argument("--output", type=Path, help="run folder (default runs/finetune-TIMESTAMP)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its last checkpoint and saved settings (CHECKPOINT is then not read)",
    )
    task = parser.add_argument_group("task")
    task.add_argument("--input-field", help="JSON field of the input text (default 'input')")
    task.add_argument("--target-field", help="JSON field of the target text (default 'target')")
    task.add_argument("--skip-bad-rows", action="store_true", help="leave bad rows out (each is still reported)")
    task.add_argument("--batch-size", type=int, help="pairs per optimizer step (default 16)")
    task.add_argument("--max-input-length", type=int, help="input tokens, eos included (default 512)")
    task.add_argument("--max-target-length", type=int, help="target tokens, eos included (default 128)")
    task.add_argument(
        "--dtype",
        choices=[d.value for d in WeightsDtype],
        help="the weights' precision while fine-tuning (default float32; bf16 keeps the routers float32)",
    )
    task.add_argument("--dropout", type=float, help="dropout outside the experts (default 0.1, the paper's)")
    task.add_argument("--expert-dropout", type=float, help="dropout inside the experts (default 0.4, the paper's)")
    task.add_argument("--metric", choices=[m.value for m in Metric], help="picks the best model (default exact_match)")
    task.add_argument(
        "--patience", type=int, help="stop after N evaluations without improvement; 0 = never (default 3)"
    )
    task.add_argument("--eval-examples", type=int, help="exact match on the first N validation pairs (default all)")
    add_override_argument(
        task, "--finetune-set", "finetune_overrides", "override any FinetuneConfig field (repeatable)"
    )
    add_override_argument(
        task,
        "--set",
        "overrides",
        "override model config fields that keep the weights' shapes, e.g. --set moe.capacity_factor=1.0 (repeatable)",
    )
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    train.add_argument("--lr", type=float, help="peak learning rate (default 3e-4)")
    train.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 10)")
    train.add_argument("--eval-every", type=int, help="evaluate loss and exact match every N steps (default 100)")
    train.add_argument("--log-every", type=int, help="write metrics every N steps (default 10)")
    train.add_argument("--checkpoint-every", type=int, help="save a resumable checkpoint every N steps (default 100)")
    train.add_argument("--micro-batches", type=int, help="gradient accumulation: split each batch into N parts")
    add_step_arguments(train)
    train.add_argument("--optimizer", choices=["adamw", "adafactor"])
    train.add_argument("--schedule", choices=["inverse-sqrt", "cosine", "constant"])
    train.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    train.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    train.add_argument("--seed", type=int, help="seed of dropout, jitter and the data order (default 0)")
    add_override_argument(train, "--train-set", "train_overrides", "override any TrainConfig field (repeatable)")
    add_parallel_arguments(train)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.set_defaults(run=run)


def _configs(args: argparse.Namespace, saved: dict[str, Any] | None) -> tuple[FinetuneConfig, TrainConfig]:
    task = FinetuneConfig.from_dict(saved["finetune"]) if saved else FinetuneConfig()
    changes = given_fields(args, (*TASK_FIELDS, *DROPOUT_FIELDS, *EVALUATION_FIELDS))
    if args.skip_bad_rows:
        changes["bad_rows"] = BadRowPolicy.SKIP
    if args.patience is not None:
        changes["patience"] = args.patience or None
    if args.seed is not None:
        changes["shuffle_seed"] = args.seed
    task = task.replace(**changes).with_overrides(args.finetune_overrides)
    train = TrainConfig.from_dict(saved["train"]) if saved else TrainConfig(**DEFAULT_TRAIN)
    changes = given_fields(args, (*TRAIN_FIELDS, *INTERVAL_FIELDS, "seed", *STEP_FIELDS))
    return task, train.replace(**changes).with_overrides(args.train_overrides)


def run(args: argparse.Namespace) -> int:
    if args.resume and args.output is None:
        raise ValueError("--resume needs --output RUN_DIR: the run folder to continue")
    require_output_under_torchrun(args.output)
    run_dir = args.output or Path("runs") / f"finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    latest = latest_checkpoint(run_dir / "checkpoints") if args.resume else None
    saved = load_checkpoint(latest, with_optimizer=False).config if latest else None
    task, train = _configs(args, saved)
    with torchrun_job("finetune", parallel_dims(args)) as strategy:
        main_rank = strategy is None or strategy.is_main
        if main_rank:
            _print_start(args, run_dir, latest, task, train)
        result = finetune(
            args.checkpoint,
            train=args.train,
            validation=args.validation,
            run_dir=run_dir,
            config=task,
            train_config=train,
            tokenizer=args.tokenizer,
            overrides=args.overrides,
            resume=args.resume,
            callbacks=[] if args.no_progress else [ProgressBar()],
            strategy=strategy,
        )
    if main_rank:
        print_table("fine-tuning summary", _summary_rows(result, task.metric))
    return 0


def _print_start(
    args: argparse.Namespace, run_dir: Path, latest: Path | None, task: FinetuneConfig, train: TrainConfig
) -> None:
    schedule = f"{train.steps} steps of {task.batch_size} pairs, lr {train.lr:g}, evaluation every {train.eval_every}"
    print_table(
        f"switchformer finetune -> {run_dir}",
        [
            ("checkpoint", f"{args.checkpoint}" + (f" (resuming {latest.name})" if latest else "")),
            ("data", f"train {args.train}, validation {args.validation}"),
            ("fields", f"{task.input_field!r} -> {task.target_field!r}"),
            ("dropout", f"{task.dropout} outside experts, {task.expert_dropout} inside"),
            ("schedule", schedule),
        ],
    )


def _figures(record: dict[str, Any] | None) -> str:
    if record is None:
        return "-"
    return f"exact match {100 * record['exact_match']:.1f}%, val loss {record['val_loss']:.4f} (step {record['step']})"


def _summary_rows(result: FinetuneResult, metric: Metric) -> list[tuple[str, str]]:
    steps = f"{result.summary['steps']}" + (" (stopped early)" if result.stopped_early else "")
    rows = [
        ("steps", steps),
        ("before", _figures(result.before)),
        (f"best by {metric.value}", _figures(result.best)),
        ("last", _figures(result.last)),
    ]
    for path, bad in result.skipped.items():
        rows.append((f"skipped rows of {Path(path).name}", ", ".join(f"line {b.line} ({b.reason})" for b in bad)))
    rows += [
        ("best model", str(result.best_dir) if result.best_dir else "-"),
        ("evaluations", str(result.run_dir / "eval.jsonl")),
    ]
    return rows

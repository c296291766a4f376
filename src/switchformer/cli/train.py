"""``switchformer train``: the main job. With no arguments it pre-trains a small Switch Transformer with span
corruption on the built-in corpus (the interpreter's standard-library sources), in minutes on a CPU (figures in
docs/training.md).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from switchformer.cli.common import (
    INTERVAL_FIELDS,
    STEP_FIELDS,
    TRAIN_FIELDS,
    add_model_arguments,
    add_override_argument,
    add_parallel_arguments,
    add_step_arguments,
    given_fields,
    model_config_from_args,
    parallel_dims,
    print_table,
    torchrun_job,
)
from switchformer.data import DataConfig, PreparedData
from switchformer.models.config import Architecture, ModelConfig
from switchformer.run_folder import METRICS_FILE, TENSORBOARD_DIR
from switchformer.training.callbacks import ProgressBar
from switchformer.training.config import TrainConfig
from switchformer.training.metrics import read_metrics
from switchformer.training.pretrain import RunConfigs, default_data_config, pretrain
from switchformer.training.report import plot_run, summary_rows
from switchformer.training.strategy import DistributedStrategy

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "switch-tiny-8"
DEFAULT_STEPS = 400


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train a Switch (or dense) model; no arguments = a small Switch model on the built-in corpus",
        description=__doc__,
    )
    add_model_arguments(parser, default_preset=DEFAULT_PRESET)
    parser.add_argument(
        "--model-type",
        choices=[a.value for a in Architecture],
        help="override the preset's architecture (decoder-only trains with next-token prediction)",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        help="text file, folder, .jsonl, .parquet or a Hugging Face dataset name (default: the built-in corpus of "
        "standard-library sources)",
    )
    data.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/datasets")
    data.add_argument("--tokenizer", help="tokenizer.json, SentencePiece .model or hub name (default: train one)")
    data.add_argument("--vocab-size", type=int, default=8192, help="size of a trained tokenizer's vocabulary")
    data.add_argument("--seq-len", type=int, default=256, help="encoder input length (or LM context length)")
    data.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step (global batch)")
    add_override_argument(data, "--data-set", "data_overrides", "override any DataConfig field (repeatable)")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS})")
    train.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    train.add_argument("--optimizer", choices=["adamw", "adafactor"])
    train.add_argument("--schedule", choices=["inverse-sqrt", "cosine", "constant"])
    train.add_argument("--warmup-steps", type=int)
    train.add_argument("--micro-batches", type=int, help="gradient accumulation: split each batch into N parts")
    add_step_arguments(train)
    train.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    train.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-every", type=int)
    train.add_argument("--log-every", type=int)
    train.add_argument("--checkpoint-every", type=int)
    add_override_argument(train, "--train-set", "train_overrides", "override any TrainConfig field (repeatable)")
    add_parallel_arguments(train)
    train.add_argument(
        "--async-checkpoint",
        action="store_true",
        help="under torchrun: write checkpoints in the background while training goes on",
    )
    parser.add_argument("--output", type=Path, help="run folder (default runs/PRESET-TIMESTAMP)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.set_defaults(run=run)


def _train_config(args: argparse.Namespace, saved: TrainConfig | None) -> TrainConfig:
    base = saved or TrainConfig(
        steps=DEFAULT_STEPS, schedule="cosine", warmup_steps=50, eval_every=50, log_every=10, checkpoint_every=100
    )
    changes = given_fields(args, (*TRAIN_FIELDS, *INTERVAL_FIELDS, *STEP_FIELDS))
    if args.async_checkpoint:
        changes["async_checkpoint"] = True
    if saved is None:
        changes["seed"] = args.seed
    return base.replace(**changes).with_overrides(args.train_overrides)


def _model_config(args: argparse.Namespace) -> ModelConfig:
    config = model_config_from_args(args.preset, args.overrides)
    if args.model_type:
        config = config.replace(architecture=Architecture(args.model_type))
    return config


def _data_config(args: argparse.Namespace, model_config: ModelConfig) -> DataConfig:
    fields = {
        "source": args.data,
        "text_field": args.text_field,
        "tokenizer": args.tokenizer,
        "vocab_size": args.vocab_size,
        "sequence_length": args.seq_len,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    return default_data_config(model_config, **fields).with_overrides(args.data_overrides)


def run(args: argparse.Namespace) -> int:
    with torchrun_job("train", parallel_dims(args)) as strategy:
        return _run(args, strategy)


def _run(args: argparse.Namespace, strategy: DistributedStrategy | None) -> int:
    main_rank = strategy is None or strategy.is_main
    if args.resume and args.output is None:
        raise ValueError("--resume needs --output RUN_DIR: the run folder to continue")
    if args.output is None and strategy is not None:
        raise ValueError("a torchrun launch needs --output RUN_DIR, the same folder on every rank")
    run_dir = args.output or Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    saved = RunConfigs.saved(run_dir) if args.resume else None
    model_config = saved.model if saved else _model_config(args)
    if strategy is not None and model_config.moe is not None:
        strategy.layout.dims.check_experts(model_config.moe.num_experts)  # before any data is prepared
    train_config = _train_config(args, saved.train if saved else None)
    data_config = saved.data if saved else _data_config(args, model_config)
    callbacks = [] if args.no_progress or not main_rank else [ProgressBar()]
    preset = args.preset if not saved else None
    summary = pretrain(
        model_config,
        train_config,
        data_config,
        run_dir,
        resume=args.resume,
        callbacks=callbacks,
        strategy=strategy,
        on_ready=lambda configs, data: _announce(run_dir, configs, data, preset, strategy),
    )
    if main_rank:
        plot = plot_run(run_dir)
        rows = summary_rows(summary, read_metrics(run_dir))
        rows.append(("metrics", str(run_dir / METRICS_FILE)))
        rows.append(("TensorBoard", f"tensorboard --logdir {run_dir / TENSORBOARD_DIR}"))
        if plot:
            rows.append(("plot", str(plot)))
        print_table("training summary", rows)
    return 0


def _announce(
    run_dir: Path, configs: RunConfigs, data: PreparedData, preset: str | None, strategy: DistributedStrategy | None
) -> None:
    """Print what is about to happen."""
    model, data_config = configs.model, configs.data
    experts = "dense" if model.moe is None else f"{model.moe.num_experts} experts"
    parallelism = "one process" if strategy is None else strategy.layout.dims.describe()
    print_table(
        f"switchformer train -> {run_dir}",
        [
            ("model", f"{preset or 'from run folder'} ({model.architecture.value}, {experts})"),
            ("data", f"{data_config.source or 'built-in corpus'}: {data.stats_line()}"),
            ("objective", data_config.objective.value),
            ("batch", f"{data_config.batch_size} x {data_config.sequence_length} tokens, {configs.train.steps} steps"),
            ("parallelism", parallelism),
        ],
    )

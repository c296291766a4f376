"""``switchformer train``: the main job. With no arguments it pre-trains a small Switch Transformer with span
corruption on the built-in corpus (the interpreter's standard-library sources) in about ten minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from switchformer.cli.common import (
    add_expert_parallel_argument,
    add_model_arguments,
    add_step_arguments,
    model_config_from_args,
    print_table,
    torchrun_job,
)
from switchformer.models.config import Architecture, ModelConfig
from switchformer.training.callbacks import ProgressBar
from switchformer.training.config import TrainConfig
from switchformer.training.metrics import read_metrics
from switchformer.training.report import plot_run, summary_rows
from switchformer.training.strategy import DistributedStrategy
from switchformer.training.trainer import Trainer

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
    data.add_argument("--data", help="text file, folder, .jsonl, .parquet or a Hugging Face dataset name "
                      "(default: the built-in corpus of standard-library sources)")  # fmt: skip
    data.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/datasets")
    data.add_argument("--tokenizer", help="tokenizer.json, SentencePiece .model or hub name (default: train one)")
    data.add_argument("--vocab-size", type=int, default=8192, help="size of a trained tokenizer's vocabulary")
    data.add_argument("--seq-len", type=int, default=256, help="encoder input length (or LM context length)")
    data.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step (global batch)")
    data.add_argument("--data-set", dest="data_overrides", action="append", default=[], metavar="FIELD=VALUE",
                      help="override any DataConfig field (repeatable)")  # fmt: skip
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
    train.add_argument("--train-set", dest="train_overrides", action="append", default=[], metavar="FIELD=VALUE",
                       help="override any TrainConfig field (repeatable)")  # fmt: skip
    add_expert_parallel_argument(train)
    parser.add_argument("--output", type=Path, help="run folder (default runs/PRESET-TIMESTAMP)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.set_defaults(run=run)


def _train_config(args: argparse.Namespace, saved: dict[str, Any] | None) -> TrainConfig:
    if saved:
        base = TrainConfig.from_dict(saved)
    else:
        base = TrainConfig(steps=DEFAULT_STEPS, schedule="cosine", warmup_steps=50, eval_every=50, log_every=10,
                           checkpoint_every=100)  # fmt: skip
    flags = {
        "steps": args.steps, "lr": args.lr, "optimizer": args.optimizer, "schedule": args.schedule,
        "warmup_steps": args.warmup_steps, "micro_batches": args.micro_batches, "precision": args.precision,
        "device": args.device, "eval_every": args.eval_every, "log_every": args.log_every,
        "checkpoint_every": args.checkpoint_every, "activation_checkpointing": args.activation_checkpointing,
        "compile": args.compile,
    }  # fmt: skip
    changes = {k: v for k, v in flags.items() if v is not None}
    if not saved:
        changes["seed"] = args.seed
    return base.replace(**changes).with_overrides(args.train_overrides)


def _model_config(args: argparse.Namespace, saved: dict[str, Any] | None) -> ModelConfig:
    if saved:
        return ModelConfig.from_dict(saved)
    config = model_config_from_args(args.preset, args.overrides)
    if args.model_type:
        config = config.replace(architecture=Architecture(args.model_type))
    return config


def _saved_configs(run_dir: Path) -> dict[str, Any] | None:
    """The configs to resume with: the latest checkpoint's (checksummed), else the run folder's config.json."""
    from switchformer.training.checkpoint import latest_checkpoint, verify_checkpoint

    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is not None:
        verify_checkpoint(latest)
        return json.loads((latest / "config.json").read_text())
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("%s is damaged and no checkpoint exists yet: starting the run afresh from the flags", path)
        return None


def run(args: argparse.Namespace) -> int:
    with torchrun_job("train", args.expert_parallel) as strategy:
        return _run(args, strategy)


def _run(args: argparse.Namespace, strategy: DistributedStrategy | None) -> int:
    from switchformer.data import DataConfig, Objective, prepare_data

    main_rank = strategy is None or strategy.is_main
    if args.resume and args.output is None:
        raise ValueError("--resume needs --output RUN_DIR: the run folder to continue")
    if args.output is None and strategy is not None:
        raise ValueError("a torchrun launch needs --output RUN_DIR, the same folder on every rank")
    run_dir = args.output or Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    saved = _saved_configs(run_dir) if args.resume else None
    if not args.resume and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise ValueError(f"run folder {run_dir} already holds checkpoints; pass --resume to continue it, "
                         "or choose a new --output")  # fmt: skip

    model_config = _model_config(args, saved["model"] if saved else None)
    train_config = _train_config(args, saved["train"] if saved else None)
    if saved:
        data_config = DataConfig.from_dict(saved["data"])
    else:
        objective = Objective.SPAN_CORRUPTION if model_config.is_encoder_decoder else Objective.CAUSAL_LM
        data_config = DataConfig(
            source=args.data, text_field=args.text_field, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            sequence_length=args.seq_len, batch_size=args.batch_size, objective=objective, seed=args.seed,
        ).with_overrides(args.data_overrides)  # fmt: skip

    if strategy is not None:
        train_config = train_config.replace(device=str(strategy.layout.device))
    run_dir.mkdir(parents=True, exist_ok=True)
    logger.info("preparing data (%s)", data_config.source or "built-in corpus: standard-library sources")
    if strategy is not None and not main_rank:
        strategy.barrier()  # the main rank trains the tokenizer and fills the cache first; the others reuse it
    data = prepare_data(data_config, run_dir)
    if strategy is not None and main_rank:
        strategy.barrier()
    if model_config.vocab_size != data.tokenizer.vocab_size:
        model_config = model_config.replace(vocab_size=data.tokenizer.vocab_size)

    extra = {"data": data_config.to_dict()}
    if main_rank:
        _announce(run_dir, model_config, train_config, data_config, data, args, saved is not None, strategy)
    callbacks = [] if args.no_progress or not main_rank else [ProgressBar()]
    tokenizer_file = Path(data.stats.cache_folder) / "tokenizer.json"  # copied into checkpoints: they stand alone
    trainer = Trainer(model_config, train_config, train_batches=data.train, validation=data.validation,
                      run_dir=run_dir, extra_config=extra, callbacks=callbacks, resume=args.resume,
                      checkpoint_files={"tokenizer.json": tokenizer_file}, strategy=strategy)  # fmt: skip
    summary = trainer.train()
    if main_rank:
        plot = plot_run(run_dir)
        rows = summary_rows(summary, read_metrics(run_dir))
        rows += [("metrics", str(run_dir / "metrics.jsonl")),
                 ("TensorBoard", f"tensorboard --logdir {run_dir / 'tensorboard'}")]  # fmt: skip
        if plot:
            rows.append(("plot", str(plot)))
        print_table("training summary", rows)
    return 0


def _announce(run_dir, model_config, train_config, data_config, data, args, resumed, strategy) -> None:
    """Write the run's config.json and print what is about to happen."""
    extra = {"data": data_config.to_dict()}
    payload = {"model": model_config.to_dict(), "train": train_config.to_dict(), **extra}
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, run_dir / "config.json")  # atomic: a kill mid-write never leaves a cut config
    print_table(
        f"switchformer train -> {run_dir}",
        [
            ("model", f"{args.preset if not resumed else 'from run folder'} ({model_config.architecture.value}, "
                      f"{'dense' if model_config.moe is None else str(model_config.moe.num_experts) + ' experts'})"),
            ("data", f"{data_config.source or 'built-in corpus'}: {data.stats_line()}"),
            ("objective", data_config.objective.value),
            ("batch", f"{data_config.batch_size} x {data_config.sequence_length} tokens, {train_config.steps} steps"),
            ("parallelism", "one process" if strategy is None else
             f"{strategy.layout.ep_size} expert-parallel x {strategy.layout.dp_size} data-parallel ranks"),
        ],
    )  # fmt: skip

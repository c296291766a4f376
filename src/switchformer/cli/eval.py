"""``switchformer eval RUN_OR_CHECKPOINT``: validation loss and perplexity of a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

from switchformer.cli.common import add_parallel_arguments, parallel_dims, print_table, torchrun_job
from switchformer.models.config import ModelConfig
from switchformer.models.factory import build_model
from switchformer.run_folder import resolve_checkpoint
from switchformer.training.checkpoint import load_checkpoint
from switchformer.training.config import Precision
from switchformer.training.evaluation import evaluate_over_ranks
from switchformer.training.pretrain import prepare_data_in_turn
from switchformer.training.strategy import SingleProcess
from switchformer.training.trainer import autocast_dtype, resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="validation loss and perplexity of a run folder or checkpoint")
    parser.add_argument("checkpoint", type=Path, help="run folder (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--data", help="evaluate on this corpus instead of the run's validation split")
    parser.add_argument("--batches", type=int, help="evaluate on at most this many validation batches")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=[p.value for p in Precision])
    add_parallel_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with torchrun_job("eval", parallel_dims(args)) as strategy:
        return _run(args, strategy or SingleProcess())


def _run(args: argparse.Namespace, strategy: SingleProcess) -> int:
    """Under torchrun each rank holds its shards of the model (any layout, whatever layout saved it) and scores
    its slice of every validation batch; the main rank prints."""
    from switchformer.data import DataConfig

    path = resolve_checkpoint(args.checkpoint)
    checkpoint = load_checkpoint(path, with_optimizer=False, with_weights=strategy.world_size == 1)
    model_config = ModelConfig.from_dict(checkpoint.config["model"])
    data_config = DataConfig.from_dict(checkpoint.config["data"])
    if args.data:
        data_config = data_config.replace(source=args.data)
    run_dir = path.parent.parent  # run/checkpoints/step-N: the run folder caches the tokenizer and corpus
    data = prepare_data_in_turn(data_config, run_dir, strategy)
    device = strategy.layout.device if strategy.layout is not None else resolve_device(args.device)
    amp_dtype = autocast_dtype(Precision(args.precision), device)
    meta = build_model(model_config, device="meta")
    model = strategy.prepare_model(meta, device=device, seed=0, compute_dtype=amp_dtype)
    strategy.load_training_state(checkpoint, model, None)
    batches = data.validation if args.batches is None else data.validation[: args.batches]
    result = evaluate_over_ranks(model, batches, strategy, device=device, amp_dtype=amp_dtype)
    if not strategy.is_main:
        return 0
    print_table(
        f"switchformer eval {path}",
        [
            ("step", str(checkpoint.step)),
            ("data", data_config.source or "built-in corpus (validation split)"),
            ("validation tokens", f"{result['val_tokens']:,}"),
            ("validation loss", f"{result['val_loss']:.4f}"),
            ("perplexity", f"{result['val_perplexity']:.2f}"),
        ],
    )
    return 0

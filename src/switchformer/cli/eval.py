"""``switchformer eval RUN_OR_CHECKPOINT``: validation loss and perplexity of a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

from switchformer.cli.common import print_table
from switchformer.models.config import ModelConfig
from switchformer.models.factory import build_model
from switchformer.training.checkpoint import load_checkpoint, load_model_state, resolve_checkpoint
from switchformer.training.config import Precision
from switchformer.training.evaluation import evaluate_model
from switchformer.training.trainer import autocast_dtype, resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="validation loss and perplexity of a run folder or checkpoint")
    parser.add_argument("checkpoint", type=Path, help="run folder (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--data", help="evaluate on this corpus instead of the run's validation split")
    parser.add_argument("--batches", type=int, help="evaluate on at most this many validation batches")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=[p.value for p in Precision])
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from switchformer.data import DataConfig, prepare_data

    path = resolve_checkpoint(args.checkpoint)
    checkpoint = load_checkpoint(path, with_optimizer=False)
    model_config = ModelConfig.from_dict(checkpoint.config["model"])
    data_config = DataConfig.from_dict(checkpoint.config["data"])
    if args.data:
        data_config = data_config.replace(source=args.data)
    run_dir = path.parent.parent  # run/checkpoints/step-N: the run folder caches the tokenizer and corpus
    data = prepare_data(data_config, run_dir)
    device = resolve_device(args.device)
    model = build_model(model_config)
    load_model_state(model, checkpoint.model_state, source=path)
    model.to(device)
    batches = data.validation if args.batches is None else data.validation[: args.batches]
    result = evaluate_model(model, batches, device=device, amp_dtype=autocast_dtype(Precision(args.precision), device))
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

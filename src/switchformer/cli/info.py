"""``switchformer info PRESET``: parameter and FLOP counts without allocating the model."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from switchformer.cli.common import model_config_from_args, switch_layer_rows
from switchformer.models.flops import model_size
from switchformer.presets import preset_names


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("info", help="parameters (total and active per token) and FLOPs per token of a preset")
    parser.add_argument("preset", help=f"one of: {', '.join(preset_names())}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--context-length", type=int, default=512, help="positions attended over (for FLOPs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = model_config_from_args(args.preset, args.overrides)
    size = model_size(config, context_length=args.context_length)
    if args.json:
        print(json.dumps(size.to_dict()))
        return 0
    table = Table(title=f"{args.preset} ({config.architecture.value})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("parameters, total", f"{size.params_total:,} ({size.params_total / 1e9:.3g}B)")
    table.add_row("parameters active per token", f"{size.params_active:,} ({size.params_active / 1e9:.3g}B)")
    table.add_row(f"forward FLOPs per token (context {args.context_length})", f"{size.flops_per_token:,}")
    if config.moe is not None:
        table.add_row("experts per Switch layer / top-k", f"{config.moe.num_experts} / {config.moe.top_k}")
        for label, value in switch_layer_rows(config):
            table.add_row(label, value)
    Console().print(table)
    return 0

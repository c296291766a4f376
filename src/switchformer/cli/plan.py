"""``switchformer plan PRESET --world-size N``: per-rank memory and traffic of a layout, before any machine starts.

Runs the same sharding code as training on a fake process group of N ranks in this one process (nothing is
allocated); see ``switchformer.parallel.plan``.
"""

from __future__ import annotations

import argparse
import json

from switchformer.cli.common import add_parallel_arguments, model_config_from_args, parallel_dims, print_table
from switchformer.parallel.mesh import ParallelDims
from switchformer.parallel.plan import Workload, plan_layout
from switchformer.presets import preset_names


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "plan", help="per-rank memory and traffic of a preset on N ranks (no machine needed)", description=__doc__
    )
    parser.add_argument("preset", help=f"one of: {', '.join(preset_names())}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--world-size", type=int, required=True, metavar="N", help="ranks (accelerators) in all")
    add_parallel_arguments(parser)
    parser.add_argument(
        "--batch-size",
        type=int,
        help="sequences per optimizer step, all ranks (default: the paper's 2^20 tokens per batch)",
    )
    parser.add_argument("--seq-len", type=int, default=512, help="encoder input (or context) length")
    parser.add_argument("--optimizer", choices=["adamw", "adafactor"], default="adamw")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = model_config_from_args(args.preset, args.overrides)
    batch_size = args.batch_size or max(2**20 // args.seq_len, 1)
    workload = Workload(batch_size=batch_size, seq_len=args.seq_len, optimizer=args.optimizer)
    plan = plan_layout(config, parallel_dims(args), args.world_size, workload)
    if args.json:
        print(json.dumps({"preset": args.preset, "world_size": args.world_size, **plan.to_dict()}))
        return 0
    gib = 2**30
    print_table(
        f"switchformer plan {args.preset} on {args.world_size} ranks",
        [
            ("layout", ParallelDims(**plan.layout).describe()),
            ("parameters on the busiest rank", f"{plan.params_per_rank:,} ({plan.params_per_rank / 1e9:.3g}B)"),
            ("weights + gradients + optimizer", f"{plan.bytes_per_rank / gib:.2f} GiB ({args.optimizer}, float32)"),
            ("activations (estimate)", f"{plan.activation_bytes / gib:.2f} GiB for {plan.tokens_per_rank:,} tokens"),
            ("all-to-all per step", f"{plan.all_to_all_bytes_per_step / gib:.2f} GiB received"),
            ("FSDP per step", f"{plan.fsdp_bytes_per_step / gib:.2f} GiB received"),
        ],
    )
    return 0

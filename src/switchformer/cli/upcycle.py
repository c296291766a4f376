"""``switchformer upcycle DENSE_CHECKPOINT OUTPUT --experts N``: sparse upcycling of a dense checkpoint.

Each Switch layer's experts start as copies of the dense FFN they replace, routers are freshly initialised and
every other weight is copied; OUTPUT is a switchformer checkpoint folder (with the tokenizer, if DENSE has one)
ready for ``switchformer finetune`` or for the trainer.
"""

from __future__ import annotations

import argparse

from switchformer.cli.common import print_table, switch_layer_rows
from switchformer.interop import copy_tokenizer_files, from_pretrained, save_pretrained
from switchformer.interop.checkpoint_io import resolve_checkpoint_folder
from switchformer.models.flops import count_parameters
from switchformer.models.upcycle import ROUTER_INIT_SCALE, upcycle
from switchformer.moe.config import MoEConfig


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("upcycle", help="turn a dense checkpoint into a Switch model (experts = FFN copies)",
                            description=__doc__)  # fmt: skip
    parser.add_argument("checkpoint", help="dense checkpoint folder (either format) or a training run folder")
    parser.add_argument("output", help="folder to write the Switch checkpoint to (created if needed)")
    parser.add_argument("--experts", type=int, required=True, help="experts per Switch layer")
    parser.add_argument("--sparse-every", type=int, help="a Switch layer every N FFNs (default: the config's, 2)")
    parser.add_argument("--router-init-scale", type=float, default=ROUTER_INIT_SCALE,
                        help="router init: truncated normal with std sqrt(scale / d_model) (paper: 0.1)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="moe.FIELD=VALUE",
                        help="any routing setting, e.g. --set moe.capacity_factor=1.0 (repeatable)")  # fmt: skip
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    source = resolve_checkpoint_folder(args.checkpoint)
    dense = from_pretrained(source)
    moe = MoEConfig(num_experts=args.experts).with_overrides(_moe_overrides(args.overrides))
    model = upcycle(dense, moe=moe, sparse_every=args.sparse_every, router_init_scale=args.router_init_scale,
                    seed=args.seed)  # fmt: skip
    folder = save_pretrained(model, args.output)
    copied = copy_tokenizer_files(source, folder)
    config = model.config
    before, _ = count_parameters(dense.config)
    total, active = count_parameters(config)
    print_table(
        f"switchformer upcycle -> {folder}",
        [
            ("source", str(source)),
            *switch_layer_rows(config),
            ("experts", f"{moe.num_experts} per Switch layer"),
            ("parameters", f"{before:,} dense -> {total:,} total, {active:,} active per token"),
            ("tokenizer", ", ".join(copied) if copied else "none found in the source (pass --tokenizer later)"),
        ],
    )
    return 0


def _moe_overrides(overrides: list[str]) -> list[str]:
    """``moe.FIELD=VALUE`` -> ``FIELD=VALUE``; the other model fields are the dense checkpoint's."""
    wrong = [item for item in overrides if not item.startswith("moe.")]
    if wrong:
        raise ValueError(f"upcycle --set takes moe.FIELD=VALUE only (got {', '.join(wrong)}); the other fields "
                         "come from the dense checkpoint (use --sparse-every for the placement)")  # fmt: skip
    return [item.removeprefix("moe.") for item in overrides]

"""``switchformer upcycle DENSE_CHECKPOINT OUTPUT --experts N``: sparse upcycling of a dense checkpoint.

Each Switch layer's experts start as copies of the dense FFN they replace, routers are freshly initialised and
every other weight is copied; OUTPUT is a switchformer checkpoint folder (with the tokenizer, if DENSE has one)
ready for ``switchformer finetune`` or for the trainer.

By default the upcycled model computes what the dense model computes until training starts: the straight-through
gate (each expert's output weighted by 1 in value; the router still learns through its probability, as in the
paper) and dropless routing (no token dropped). ``--set moe.gate=probability`` gives the paper's gate, which scales
each FFN copy by the router's probability (about 1/N at first); setting a capacity (``--set
moe.capacity_factor=1.25``, ``eval_capacity_factor``, ``expert_capacity``, ``min_capacity``) turns dropless
routing off. The output says which gate and capacity were chosen and how far the logits are from the dense
model's.
"""

from __future__ import annotations

import argparse

from switchformer.cli.common import print_table, switch_layer_rows
from switchformer.interop import copy_tokenizer_files, from_pretrained, save_pretrained
from switchformer.interop.checkpoint_io import resolve_checkpoint_folder
from switchformer.models.flops import count_parameters
from switchformer.models.upcycle import ROUTER_INIT_SCALE, LogitGap, logit_gap, upcycle, upcycling_moe
from switchformer.moe.config import Gate, MoEConfig

CAPACITY_FIELDS = {"capacity_factor", "eval_capacity_factor", "expert_capacity", "min_capacity"}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "upcycle",
        help="turn a dense checkpoint into a Switch model (experts = FFN copies) that starts as the dense model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="dense checkpoint folder (either format) or a training run folder")
    parser.add_argument("output", help="folder to write the Switch checkpoint to (created if needed)")
    parser.add_argument("--experts", type=int, required=True, help="experts per Switch layer")
    parser.add_argument("--sparse-every", type=int, help="a Switch layer every N FFNs (default: the config's, 2)")
    parser.add_argument(
        "--router-init-scale",
        type=float,
        default=ROUTER_INIT_SCALE,
        help="router init: truncated normal with std sqrt(scale / d_model) (paper: 0.1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="moe.FIELD=VALUE",
        help="any routing setting, e.g. --set moe.gate=probability (the paper's gate) or --set "
        "moe.capacity_factor=1.25 (a capacity, no longer dropless); repeatable. Defaults: straight-through gate, "
        "dropless",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    source = resolve_checkpoint_folder(args.checkpoint)
    dense = from_pretrained(source)
    moe = _routing(args.experts, _moe_overrides(args.overrides))
    model = upcycle(
        dense, moe=moe, sparse_every=args.sparse_every, router_init_scale=args.router_init_scale, seed=args.seed
    )
    gap = logit_gap(dense, model)
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
            ("gate", _describe_gate(moe)),
            ("capacity", _describe_capacity(moe)),
            ("logits vs dense", _describe_gap(gap)),
            ("parameters", f"{before:,} dense -> {total:,} total, {active:,} active per token"),
            ("tokenizer", ", ".join(copied) if copied else "none found in the source (pass --tokenizer later)"),
        ],
    )
    return 0


def _routing(experts: int, overrides: list[str]) -> MoEConfig:
    """:func:`upcycling_moe` with the overrides; a capacity asked for (and dropless not) turns dropless off."""
    fields = {item.split("=", 1)[0].strip() for item in overrides}
    asked_capacity = bool(fields & CAPACITY_FIELDS) and "dropless" not in fields
    return upcycling_moe(experts, dropless=not asked_capacity).with_overrides(overrides)


def _describe_gate(moe: MoEConfig) -> str:
    if moe.gate is Gate.STRAIGHT_THROUGH:
        return "straight-through: experts weighted by 1 in value, the router learns through p_i(x) as in the paper"
    return "probability (the paper's): each copy of the FFN scaled by p_i(x), about 1/experts at first"


def _describe_capacity(moe: MoEConfig) -> str:
    if moe.dropless:
        return "dropless: no token dropped (a capacity setting, e.g. --set moe.capacity_factor=1.25, turns it off)"
    if moe.expert_capacity is not None:
        return f"fixed: {moe.expert_capacity} tokens per expert and {moe.grouping.value} group"
    return (
        f"factor {moe.capacity_factor:g} in training, {moe.eval_capacity_factor:g} in evaluation, "
        f"{moe.grouping.value} groups (overflowing tokens skip their FFN)"
    )


def _describe_gap(gap: LogitGap) -> str:
    return (
        f"max |difference| {gap.max_abs_difference:.2g} (largest logit {gap.largest_logit:.3g}, relative "
        f"{gap.relative:.1e}); {gap.dropped_fraction:.1%} of tokens dropped, random tokens in eval mode"
    )


def _moe_overrides(overrides: list[str]) -> list[str]:
    """``moe.FIELD=VALUE`` -> ``FIELD=VALUE``; the other model fields are the dense checkpoint's."""
    wrong = [item for item in overrides if not item.startswith("moe.")]
    if wrong:
        raise ValueError(
            f"upcycle --set takes moe.FIELD=VALUE only (got {', '.join(wrong)}); the other fields come from the "
            "dense checkpoint (use --sparse-every for the placement)"
        )
    return [item.removeprefix("moe.") for item in overrides]

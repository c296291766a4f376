"""Cross-attention through the key and value weights against projecting the encoder output, in our own model.

    python bench/bench_cross_attention.py --weights /tmp/genbench/sb8
    python bench/bench_cross_attention.py --layer-sweep

A forward without a cache whose decoder input is short against the encoder output attends through the weights
(``switchformer.layers.attention.absorbed_attention_pays``). This times ``bench_generation``'s 8 x 512 (+16)
forward and its fine-tuning step (4 x 256 -> 32) on the published shape with that rule as it is and with it
turned off, in the same process and rounds (``harness.interleaved_medians``); speedup = projected / through the
weights. The check column gives the largest relative difference of the forward's logits between the two, and
how many times a run attended through the weights.

``--layer-sweep`` times one cross-attention layer of that shape (d_model 768, 12 heads of 64) both ways, forward
and forward + backward, for decoder inputs around the rule's break-even over 256 and 512 encoder positions: how
close the multiply-add count the rule compares comes to the measured crossover.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

import bench_generation
import harness
from harness import Column, markdown_table, ms, ratio
from switchformer import from_pretrained
from switchformer.layers import attention


def main(argv: list[str]) -> None:
    p = harness.argument_parser(__doc__, repeats=5)
    p.add_argument("--weights", type=Path, help="bench_generation's checkpoint (built if missing)")
    p.add_argument("--layer-sweep", action="store_true", help="time one layer both ways over decoder input lengths")
    p.add_argument("--batch", type=int, default=4, help="batch rows of the layer sweep")
    args = p.parse_args(argv)
    if args.weights is None and not args.layer_sweep:
        p.error("give --weights (the checkpoint folder, built if missing) or --layer-sweep")
    harness.configure(threads=args.threads, huge_pages=True)
    if args.layer_sweep:
        layer_sweep(args.batch, args.repeats)
        return
    import transformers

    folder = bench_generation.build_weights(args.weights)
    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(folder).eval()
    ours = from_pretrained(folder).eval()
    cases = [bench_generation.forward_case(hf, ours, 8, 512), bench_generation.finetune_case(hf, ours)]
    drop_grads = functools.partial(bench_generation.drop_grads, list(ours.parameters()))
    print(harness.machine_summary())
    rows = []
    for case in cases:
        run = case.runs[bench_generation.OURS]
        candidates = {"through the weights": run, "projected": forcing(run, through_weights=False)}
        calls, logits = count_absorbed(run)
        check = f"{calls} calls through the weights"
        if isinstance(logits, torch.Tensor):
            check += f", logits {harness.largest_relative_difference([logits], [candidates['projected']()]):.1e}"
        drop_grads()
        seconds = harness.interleaved_medians(candidates, repeats=args.repeats, before_each=drop_grads)
        speedup = seconds["projected"] / seconds["through the weights"]
        rows.append([case.name, seconds["through the weights"], seconds["projected"], speedup, check])
    columns = [Column("case"), Column("through the weights ms", ms), Column("projected ms", ms)]
    print(f"\nmedians of {args.repeats} rounds, {torch.get_num_threads()} threads, float32")
    print(markdown_table([*columns, Column("speedup", ratio), Column("check")], rows))


def forcing(run: Callable[[], object], *, through_weights: bool) -> Callable[[], object]:
    """``run`` with the rule overridden: cross-attention without a cache always attends through the weights (where
    its projections are plain), or always projects the memory."""

    def forced() -> object:
        with mock.patch.object(attention, "absorbed_attention_pays", lambda *sizes: through_weights):
            return run()

    return forced


def layer_sweep(batch: int, repeats: int) -> None:
    """One cross-attention layer of the published shape, through the weights (forced) against projected."""
    torch.manual_seed(0)
    layer = attention.Attention(768, 12, 64)
    sweep = {256: (16, 32, 40, 48, 54, 64), 512: (16, 32, 48, 56, 61, 64, 96)}
    rows = [time_layer(layer, batch, queries, keys, repeats) for keys, counts in sweep.items() for queries in counts]
    columns = [Column("queries over keys"), Column("rule picks")]
    for name in ("forward", "forward + backward"):
        columns += [Column(f"{name}: through ms", ms), Column("projected ms", ms), Column("speedup", ratio)]
    print(harness.machine_summary())
    print(f"\none cross-attention layer (d_model 768, 12 x 64 heads), medians of {repeats} rounds, float32")
    print(
        "speedup = projected / through the weights; equal multiply-adds at 54.9 queries over 256 keys and 61.4 over "
        "512; the rule asks for 10% fewer (rule picks)"
    )
    print(markdown_table(columns, rows))


def time_layer(layer: attention.Attention, batch: int, queries: int, keys: int, repeats: int) -> list[object]:
    """A sweep row: what the rule picks, then each way's forward and forward + backward times and the speedups."""
    memory = torch.randn(batch, keys, 768)
    bias = torch.zeros(1, 1, 1, keys)
    x = torch.randn(batch, queries, 768, requires_grad=True)

    def forward() -> None:
        with torch.no_grad():
            layer(x, bias, memory_BMD=memory, keep_kv=False)

    def forward_backward() -> None:
        out, _ = layer(x, bias, memory_BMD=memory, keep_kv=False)
        out.sum().backward()

    picks = attention.absorbed_attention_pays(queries, keys, 64, 768)
    row: list[object] = [f"{batch} x {queries} over {keys}", "through the weights" if picks else "projected"]
    drop_grads = functools.partial(bench_generation.drop_grads, [x, *layer.parameters()])
    for run in (forward, forward_backward):
        candidates = {"through": forcing(run, through_weights=True), "projected": forcing(run, through_weights=False)}
        seconds = harness.interleaved_medians(candidates, repeats=repeats, before_each=drop_grads)
        row += [seconds["through"], seconds["projected"], seconds["projected"] / seconds["through"]]
    return row


def count_absorbed(run) -> tuple[int, object]:
    """How many times one call of ``run`` attends through the weights, and what the call returned."""
    absorbed = attention.Attention._absorbed_attention
    calls = []

    def counting(*args: object) -> torch.Tensor:
        calls.append(1)
        return absorbed(*args)

    with mock.patch.object(attention.Attention, "_absorbed_attention", counting):
        result = run()
    return len(calls), result


if __name__ == "__main__":
    main(sys.argv[1:])

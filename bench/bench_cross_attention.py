"""Cross-attention through the key and value weights against projecting the encoder output, in our own model.

    python bench/bench_cross_attention.py --weights /tmp/genbench/sb8

A forward without a cache whose decoder input is short against the encoder output attends through the weights
(``switchformer.layers.attention.absorbed_attention_pays``). This times ``bench_generation``'s 8 x 512 (+16)
forward and its fine-tuning step (4 x 256 -> 32) on the published shape with that rule as it is and with it
turned off, in the same process and rounds (``harness.interleaved_medians``); speedup = projected / through the
weights. The check column gives the largest relative difference of the forward's logits between the two, and
how many times a run attended through the weights.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

import bench_generation
import harness
from harness import Column, markdown_table, ms, ratio
from switchformer import from_pretrained
from switchformer.layers import attention


def main(argv: list[str]) -> None:
    p = harness.argument_parser(__doc__, repeats=5)
    p.add_argument("--weights", type=Path, required=True, help="bench_generation's checkpoint (built if missing)")
    args = p.parse_args(argv)
    harness.configure(threads=args.threads, huge_pages=True)
    import transformers

    folder = bench_generation.build_weights(args.weights)
    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(folder).eval()
    ours = from_pretrained(folder).eval()
    cases = [bench_generation.forward_case(hf, ours, 8, 512), bench_generation.finetune_case(hf, ours)]
    rule = attention.absorbed_attention_pays

    def projected(run):
        attention.absorbed_attention_pays = lambda *sizes: False
        try:
            return run()
        finally:
            attention.absorbed_attention_pays = rule

    drop_grads = functools.partial(bench_generation.drop_grads, list(ours.parameters()))
    print(harness.machine_summary())
    rows = []
    for case in cases:
        run = case.runs[bench_generation.OURS]
        candidates = {"through the weights": run, "projected": lambda run=run: projected(run)}
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


def count_absorbed(run) -> tuple[int, object]:
    """How many times one call of ``run`` attends through the weights, and what the call returned."""
    absorbed = attention.Attention._absorbed_attention
    calls = []
    attention.Attention._absorbed_attention = lambda *args: calls.append(1) or absorbed(*args)
    try:
        result = run()
    finally:
        attention.Attention._absorbed_attention = absorbed
    return len(calls), result


if __name__ == "__main__":
    main(sys.argv[1:])

"""Cross-attention through the key and value weights against projecting the encoder output, in our own model.

    python bench/bench_cross_attention.py --weights /tmp/genbench/sb8

A forward without a cache whose decoder input is short against the encoder output attends through the weights
(``switchformer.layers.attention.absorbed_attention_pays``). This times ``bench_generation``'s 8 x 512 (+16)
forward and its fine-tuning step (4 x 256 -> 32) on the published shape with that rule as it is and with it
turned off, in the same process and rounds (``harness.interleaved_medians``); speedup = projected / through the
weights.
"""

from __future__ import annotations

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

    def projected(run) -> None:
        attention.absorbed_attention_pays = lambda *sizes: False
        try:
            run()
        finally:
            attention.absorbed_attention_pays = rule

    def drop_grads() -> None:
        for param in ours.parameters():
            param.grad = None

    print(harness.machine_summary())
    rows = []
    for case in cases:
        run = case.runs[bench_generation.OURS]
        candidates = {"through the weights": run, "projected": lambda run=run: projected(run)}
        seconds = harness.interleaved_medians(candidates, repeats=args.repeats, before_each=drop_grads)
        rows.append([case.name, seconds["through the weights"], seconds["projected"]])
        rows[-1].append(rows[-1][2] / rows[-1][1])
    columns = [Column("case"), Column("through the weights ms", ms), Column("projected ms", ms)]
    print(f"\nmedians of {args.repeats} rounds, {torch.get_num_threads()} threads, float32")
    print(markdown_table([*columns, Column("speedup", ratio)], rows))


if __name__ == "__main__":
    main(sys.argv[1:])

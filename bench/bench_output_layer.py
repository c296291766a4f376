"""The output layer's loss, forward + backward: logits then cross-entropy, against the chunked ``linear_cross_entropy``.

    python bench/bench_output_layer.py                      # the comparison's shape and T5's vocabulary
    python bench/bench_output_layer.py --shapes 4096x128x4096 --chunks 128 256 512 1024

`unfused` is what the models do when logits are asked for and what `transformers` does: ``F.linear`` to
[tokens, vocab] logits, a float32 copy, ``F.cross_entropy`` over the labels that count (the models'
``token_cross_entropy``). `chunked` is ``linear_cross_entropy`` (``return_logits=False``: evaluation, and
training with ``chunked_loss=true``).
Both sum the loss over the same labels and backpropagate into the hidden states and the weight; the `check` column
is the largest relative difference of the two losses and gradients, measured before timing. Memory is the peak of
bytes the CPU allocator held during one forward + backward, less the weight's gradient (``harness``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

import harness
from harness import Column
from switchformer.layers.linear_cross_entropy import chunk_rows, linear_cross_entropy
from switchformer.models.base import token_cross_entropy


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = harness.argument_parser(__doc__, repeats=7)
    p.add_argument(
        "--shapes", nargs="+", default=["4096x128x4096", "4096x512x32128"],
        help="tokens x d_model x vocab; the default: compare's model, and a T5-base-width layer on T5's vocabulary",
    )  # fmt: skip
    p.add_argument("--chunks", nargs="*", type=int, default=[], help="extra chunk sizes (rows) beside the default")
    return p.parse_args(argv)


def make_step(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], hidden: torch.Tensor, weight: torch.Tensor
) -> Callable[[], list[torch.Tensor]]:
    def step() -> list[torch.Tensor]:
        hidden.grad = weight.grad = None
        loss = loss_fn(hidden, weight)
        loss.backward()
        return [loss.detach(), hidden.grad, weight.grad]

    return step


def bench_shape(shape: str, chunks: list[int], repeats: int) -> list[tuple[object, ...]]:
    tokens, d_model, vocab = (int(x) for x in shape.split("x"))
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(tokens, d_model, generator=g) * d_model**-0.5).requires_grad_()
    weight = (torch.randn(vocab, d_model, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    default = chunk_rows(vocab)
    cases = {"unfused": make_step(lambda h, w: token_cross_entropy(h @ w.t(), labels)[0] * tokens, hidden, weight)}
    for rows in [default, *(c for c in chunks if c != default)]:
        cases[f"chunked, {rows} rows"] = make_step(
            lambda h, w, rows=rows: linear_cross_entropy(h, w, labels, chunk_size=rows), hidden, weight
        )
    measured = harness.measure_steps(cases, "unfused", [weight], repeats)
    base = measured.times["unfused"]
    return [
        (shape, name, measured.times[name], base / measured.times[name], measured.memory[name] / 2**20,
         measured.checks[name])
        for name in cases
    ]  # fmt: skip


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    harness.configure(threads=args.threads, huge_pages=True)
    print(harness.machine_summary())
    rows = [row for shape in args.shapes for row in bench_shape(shape, args.chunks, args.repeats)]
    harness.print_step_table([Column("tokens x d_model x vocab"), Column("method")], "unfused", rows, args.repeats)


if __name__ == "__main__":
    main(sys.argv[1:])

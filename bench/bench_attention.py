"""The attention core in training, forward + backward: ``scaled_dot_product_attention`` against ``explicit_attention``.

    python bench/bench_attention.py                        # the comparison's shape and a T5-base-like one
    python bench/bench_attention.py --shapes 32x4x128x32 --repeats 15

T5's attention adds a learned relative position bias to the scores, so training needs the bias's gradient. On CPU,
SDPA's fused (flash) kernel cannot give it and SDPA falls back to its generic math kernel; in bf16 its flash
backward is slow as well. `explicit` is the plain matmul, float32 softmax, matmul that ``Attention`` runs on CPU
in those cases (``explicit_attention_pays``); `sdpa` is what SDPA itself picks. Rows with a frozen bias show the
case where SDPA keeps its fused kernel (``Attention`` then keeps SDPA in float32). The bias holds a causal mask
(the models' large finite negative). `check` is the largest relative difference from SDPA of the output and of
every input's gradient, measured before timing; `memory` is the peak of bytes the CPU allocator held in one
forward + backward, less the bias gradient (``harness``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

import harness
from harness import Column
from switchformer.layers.attention import explicit_attention

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = harness.argument_parser(__doc__, repeats=9)
    p.add_argument(
        "--shapes", nargs="+", default=["32x4x128x32", "8x12x512x64"],
        help="batch x heads x sequence x d_kv; the default: compare's model, and T5-base's heads on 512 tokens",
    )  # fmt: skip
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bf16"])
    return p.parse_args(argv)


def make_step(
    attend: Callable[..., torch.Tensor], inputs: list[torch.Tensor], upstream: torch.Tensor
) -> Callable[[], list[torch.Tensor]]:
    q, k, v, bias = inputs

    def step() -> list[torch.Tensor]:
        for tensor in inputs:
            tensor.grad = None
        out = attend(q, k, v, bias)
        out.backward(upstream)
        return [out.detach().float()] + [t.grad.float() for t in inputs if t.grad is not None]

    return step


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)


def bench_case(shape: str, dtype_name: str, bias_grad: bool, repeats: int) -> list[tuple[object, ...]]:
    batch, heads, length, d_kv = (int(x) for x in shape.split("x"))
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    q, k, v = ((torch.randn(batch, heads, length, d_kv, generator=g) * d_kv**-0.25).to(dtype) for _ in range(3))
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    bias = torch.randn(1, heads, length, length, generator=g).masked_fill(causal, torch.finfo(torch.float32).min)
    inputs = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), bias.requires_grad_(bias_grad)]
    upstream = torch.randn(batch, heads, length, d_kv, generator=g).to(dtype)
    cases = {
        "sdpa": make_step(sdpa, inputs, upstream),
        "explicit": make_step(explicit_attention, inputs, upstream),
    }
    measured = harness.measure_steps(cases, "sdpa", [bias], repeats)
    base = measured.times["sdpa"]
    bias_text = "learned" if bias_grad else "frozen"
    return [
        (
            shape,
            dtype_name,
            bias_text,
            name,
            measured.times[name],
            base / measured.times[name],
            measured.memory[name] / 2**20,
            measured.checks[name],
        )
        for name in cases
    ]


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    harness.configure(threads=args.threads, huge_pages=True)
    print(harness.machine_summary())
    rows = [
        row
        for shape in args.shapes
        for dtype_name in args.dtypes
        for bias_grad in (True, False)
        for row in bench_case(shape, dtype_name, bias_grad, args.repeats)
    ]
    leading = [Column("batch x heads x seq x d_kv"), Column("dtype"), Column("bias"), Column("method")]
    harness.print_step_table(leading, "sdpa", rows, args.repeats)


if __name__ == "__main__":
    main(sys.argv[1:])

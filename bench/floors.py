"""What the machine allows, measured in the benchmark's own process: the floors a measured time is set against.

- memory: the rates of a large copy and of a read (a decoding step streams its weights);
- matmul streaming: the rate at which a product reads a weight for a few rows, with ``torch.mm``, with oneDNN's
  packed copies (what ``generate`` uses), or with inductor's frozen-weight CPU GEMM (what a compiled decoding
  step could use);
- arithmetic: the floating-point operations a run does (torch's ``FlopCounterMode``) and the rate of ``torch.mm``
  at the model's GEMM shapes, whose quotient bounds a run that does that arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils import flop_counter

import harness
from switchformer.layers.prepacked import PrepackedWeights

_aten = torch.ops.aten
# The CPU flash-attention kernels, which FlopCounterMode has no formula for; same arithmetic as the other SDPA kernels.
_CPU_ATTENTION_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)
    ),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(grad, q, k, v)
    ),
}


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> tuple[float, float]:
    """Bytes per second of a large tensor copy (counting the bytes read and the bytes written), and of reading
    alone (a sum over the same tensor): a decoding step only reads its weights."""
    src = torch.ones(int(gib * 2**30) // 4)
    dst = torch.empty_like(src)
    seconds = harness.interleaved_medians({"copy": lambda: dst.copy_(src), "read": src.sum}, repeats=repeats)
    nbytes = src.numel() * 4
    return 2 * nbytes / seconds["copy"], nbytes / seconds["read"]


def _streamed_experts(dtype: torch.dtype) -> torch.Tensor:
    """768 x 3072 matrices (an expert's first) numerous enough to hold 512 MiB, beyond the last-level cache."""
    one = 768 * 3072 * torch.finfo(dtype).bits // 8
    return torch.randn(-(-(2**29) // one), 768, 3072).to(dtype)


def matmul_bandwidth(rows: int, dtype: torch.dtype, packed: bool, repeats: int = 5) -> float:
    """Bytes of weights per second that ``x @ W`` streams for ``rows`` rows of ``x`` (``_streamed_experts``): the
    matmul library's own floor, with ``torch.mm`` on the stored weights or (``packed``) with the copies decoding
    packs for oneDNN."""
    weights = _streamed_experts(dtype)
    x = torch.randn(rows, 768).to(dtype)
    copies = PrepackedWeights()
    if packed:
        for expert in range(len(weights)):
            copies.expert_product(x, weights, expert)

    def stream() -> None:
        for expert, w in enumerate(weights):
            copies.expert_product(x, weights, expert) if packed else torch.mm(x, w)

    seconds = harness.interleaved_medians({"stream": stream}, repeats=repeats)["stream"]
    return weights.numel() * weights.element_size() / seconds


def compiled_matmul_bandwidth(rows: int, repeats: int = 5) -> float:
    """The same stream in float32 through ``torch.compile`` with frozen weights and inductor's CPU GEMM template
    (weights packed at compile time, a micro-kernel per shape): the rate a decoding step compiled with its weights
    as constants could read them. Compiles for tens of seconds; needs a C++ compiler."""
    import torch._inductor.config as inductor

    stored = _streamed_experts(torch.float32)
    linears = nn.ModuleList(nn.Linear(768, 3072, bias=False) for _ in stored)
    with torch.no_grad():
        for linear, w in zip(linears, stored, strict=True):
            linear.weight.copy_(w.t())
    del stored

    class Stream(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linears = linears

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [linear(x) for linear in self.linears]

    x = torch.randn(rows, 768)
    patch = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
    with inductor.patch(patch), torch.no_grad():
        compiled = torch.compile(Stream().eval())
        compiled(x)
        seconds = harness.interleaved_medians({"stream": lambda: compiled(x)}, repeats=repeats)["stream"]
    return sum(linear.weight.numel() * 4 for linear in linears) / seconds


def counted_flops(run: Callable[[], object]) -> int:
    """Floating-point operations of ``run``'s matrix products and attention, counted by ``FlopCounterMode``."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with counter:
        run()
    return counter.get_total_flops()


def gemm_rate(shapes: Iterable[tuple[int, int, int]], repeats: int = 5) -> float:
    """The best of ``torch.mm``'s median rates (FLOP/s) over ``(M, K, N)`` shapes, float32, weights ``[N, K]`` as
    ``nn.Linear`` stores them: the rate the arithmetic floor assumes for every product of a run."""
    rates = []
    for m, k, n in shapes:
        x, w = torch.randn(m, k), torch.randn(n, k)
        seconds = harness.interleaved_medians({"mm": lambda x=x, w=w: torch.mm(x, w.t())}, repeats=repeats)["mm"]
        rates.append(2 * m * k * n / seconds)
    return max(rates)

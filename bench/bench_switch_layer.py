"""Switch layer speed and memory against a FLOP-matched dense FFN and transformers' SwitchTransformersSparseMLP.

    python bench/bench_switch_layer.py            # default grid (about 10 minutes on 2 idle cores)
    python bench/bench_switch_layer.py --quick    # a few minutes
    python bench/bench_switch_layer.py --experts 8 32 128 256 --tokens 4096 16384 --dtypes float32 bfloat16 \
        --modes cf1.0 cf1.25 dropless --compile all   # the whole grid (hours)

All candidates see the same input and upstream gradient in the same process, measured round by round (see
``harness.interleaved_medians``). Capacity: both Switch layers route each sequence as one group (our
``grouping='sequence'``, the transformers layer's semantics) with the same fixed ``expert_capacity`` =
round(cf * seq_len / experts), so they drop the same tokens; "dropless" is our ``dropless=True`` against
transformers with a capacity of a whole sequence. The check column confirms equal outputs (float32) first.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

import torch

import harness
from harness import Column, ms, ratio
from switchformer import SwitchFFN
from switchformer.layers.activation import Activation
from switchformer.layers.feed_forward import DenseFFN

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class Result:
    tokens: int
    dtype: str
    experts: int
    mode: str
    pass_: str
    dense: float
    ours: float
    compiled: float | None
    hf: float | None
    floor: float | None
    mem_ours: float | None  # peak activation memory relative to the dense FFN's
    mem_hf: float | None
    check: str


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 and 128 experts, float32, cf1.0 and dropless, 3 repeats")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128, 256])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    p.add_argument("--modes", nargs="+", default=["cf1.0", "dropless"], help="cf<factor> (e.g. cf1.25) or dropless")
    p.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd+bwd", "fwd"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (times with synchronisation, memory from CUDA stats)")
    p.add_argument(
        "--compile",
        choices=["off", "some", "all"],
        default="some",
        help="torch.compile our layer too: 'some' = float32 and the first capacity mode only (compiling takes time)",
    )
    p.add_argument("--no-hf", action="store_true", help="skip the transformers layer")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-thp", action="store_true", help="leave PyTorch's transparent-huge-page allocation off")
    p.add_argument("--system-malloc", action="store_true", help="let glibc return freed memory (see harness)")
    p.add_argument("--profile", action="store_true", help="also print where our layer's fwd+bwd time goes")
    args = p.parse_args(argv)
    if args.quick:
        args.experts, args.dtypes, args.modes, args.repeats = [8, 128], ["float32"], ["cf1.0", "dropless"], 3
    return args


def switch_kwargs(mode: str, seq_len: int, experts: int) -> dict[str, object]:
    if mode == "dropless":
        return {"dropless": True}
    factor = float(mode.removeprefix("cf"))
    return {"expert_capacity": max(1, round(factor * seq_len / experts))}


def build_hf(ours: SwitchFFN, capacity: int) -> torch.nn.Module | None:
    """transformers' layer with our weights (router ``[E, D]``; experts transposed into ``nn.Linear`` layout)."""
    try:
        from transformers.models.switch_transformers.configuration_switch_transformers import (
            SwitchTransformersConfig,
        )
        from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP
    except ImportError:
        return None
    cfg = ours.config
    hf_config = SwitchTransformersConfig(
        d_model=cfg.d_model,
        d_ff=cfg.d_ff,
        num_experts=cfg.moe.num_experts,
        expert_capacity=capacity,
        router_jitter_noise=0.0,
        dropout_rate=0.0,
        dense_act_fn="relu",
        router_bias=False,
    )
    hf = SwitchTransformersSparseMLP(hf_config)
    with torch.no_grad():
        hf.router.classifier.weight.copy_(ours.router.weight)
        for e in range(cfg.moe.num_experts):
            hf.experts[f"expert_{e}"].wi.weight.copy_(ours.experts.wi[e].t())
            hf.experts[f"expert_{e}"].wo.weight.copy_(ours.experts.wo[e].t())
    return hf


def hidden(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.hidden_states  # type: ignore[attr-defined]


def forward_fn(module: Callable[..., object], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module(x)

    return run


def train_fn(module: Callable[..., object], x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """Forward and backward; for our layer the auxiliary losses join the backward, as in training."""

    def run() -> None:
        out = module(x.detach().requires_grad_(True))
        loss = (hidden(out) * grad).sum()
        if not isinstance(out, torch.Tensor):
            loss = loss + 1e-2 * out.load_balancing_loss + 1e-3 * out.z_loss  # type: ignore[attr-defined]
        loss.backward()

    return run


def check_against_hf(ours: SwitchFFN, hf: torch.nn.Module | None, x: torch.Tensor) -> str:
    """Same drops and outputs in float32 (before the layers are cast), so the timings compare like with like."""
    if hf is None:
        return "no-hf"
    with torch.no_grad():
        a, b = hidden(ours(x)), hf(x)
    same_drops = torch.equal(a.abs().sum(-1) == 0, b.abs().sum(-1) == 0)
    close = torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    return "ok" if same_drops and close else f"DIFF(drops={same_drops}, max={float((a - b).abs().max()):.1e})"


def floor_fn(ours: SwitchFFN) -> Callable[[], None]:
    """The memory-traffic floor: read every expert weight once and write a gradient-sized tensor once.

    One fused elementwise pass into buffers allocated up front, so it measures bandwidth and nothing else (no page
    faults, no allocator): the least any backward must spend to produce the expert weights' gradients.
    """
    wi, wo = ours.experts.wi.detach(), ours.experts.wo.detach()
    grad_wi, grad_wo = torch.empty_like(wi), torch.empty_like(wo)

    def run() -> None:
        torch.mul(wi, 1.0, out=grad_wi)
        torch.mul(wo, 1.0, out=grad_wo)

    return run


def run_config(args: argparse.Namespace, tokens: int, dtype_name: str, experts: int, mode: str) -> list[Result]:
    dtype = DTYPES[dtype_name]
    d, f, s = args.d_model, args.d_ff, args.seq_len
    device = torch.device(args.device)
    torch.manual_seed(0)
    x32 = torch.randn(tokens // s, s, d, device=device)
    kwargs = switch_kwargs(mode, s, experts)
    ours = SwitchFFN(d_model=d, d_ff=f, num_experts=experts, router_jitter=0.0, grouping="sequence", **kwargs)
    dense = DenseFFN(d, f, Activation.RELU)
    dense.reset_parameters(init_scale=0.1)
    hf = None if args.no_hf else build_hf(ours, int(kwargs.get("expert_capacity", s)))  # type: ignore[arg-type]
    ours.to(device)
    dense.to(device)
    if hf is not None:
        hf.to(device)
    check = check_against_hf(ours, hf, x32)
    modules = [m for m in (ours, dense, hf) if m is not None]
    for m in modules:
        m.to(dtype)
    x, grad = x32.to(dtype), torch.randn_like(x32).to(dtype)
    compile_here = args.compile == "all" or (
        args.compile == "some"
        and dtype_name == "float32"
        and mode == next((m for m in args.modes if m != "dropless"), None)
    )
    compiled = torch.compile(ours) if compile_here and mode != "dropless" else None

    def drop_grads() -> None:
        for m in modules:
            for p in m.parameters():
                p.grad = None

    results = []
    for pass_ in args.passes:
        make = (lambda m: forward_fn(m, x)) if pass_ == "fwd" else (lambda m: train_fn(m, x, grad))
        cases: dict[str, Callable[[], object]] = {"dense": make(dense), "ours": make(ours)}
        if compiled is not None:
            cases["compiled"] = make(compiled)
        if hf is not None:
            cases["hf"] = make(hf)
        if pass_ == "fwd+bwd":
            cases["floor"] = floor_fn(ours)
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        times = harness.interleaved_medians(cases, repeats=args.repeats, before_each=drop_grads, sync=sync)
        mem_ours = mem_hf = None
        if pass_ == "fwd+bwd" and not args.no_memory:
            peak = harness.peak_cuda_activation_bytes if device.type == "cuda" else harness.peak_activation_bytes
            dense_bytes = peak(make(dense), dense.parameters())
            mem_ours = peak(make(ours), ours.parameters()) / dense_bytes
            if hf is not None:
                mem_hf = peak(make(hf), hf.parameters()) / dense_bytes
        results.append(
            Result(
                tokens,
                dtype_name,
                experts,
                mode,
                pass_,
                times["dense"],
                times["ours"],
                times.get("compiled"),
                times.get("hf"),
                times.get("floor"),
                mem_ours,
                mem_hf,
                check,
            )
        )
        print(format_rows(results[-1:], header=False), flush=True)
    if args.profile:
        title = f"{tokens} tokens, {dtype_name}, {experts} experts, {mode}"
        print_profile(train_fn(ours, x, grad), drop_grads, title, device)
    return results


def print_profile(step: Callable[[], None], drop_grads: Callable[[], None], title: str, device: torch.device) -> None:
    """Self time per op of one profiled fwd+bwd (after a warm-up step): CPU time, or kernel time on CUDA."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    drop_grads()
    step()
    drop_grads()
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    print(f"\nprofile of our layer's fwd+bwd ({title}):")
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=20))


COLUMNS = [
    Column("tokens"),
    Column("dtype"),
    Column("E"),
    Column("capacity"),
    Column("pass"),
    Column("dense ms", ms),
    Column("ours ms", ms),
    Column("ours compiled ms", ms),
    Column("transformers ms", ms),
    Column("floor ms", ms),
    Column("ours / dense", ratio),
    Column("ours / (dense + floor)", ratio),
    Column("transformers / ours", ratio),
    Column("memory ours / dense", ratio),
    Column("memory transformers / dense", ratio),
    Column("check"),
]


def format_rows(results: list[Result], *, header: bool = True) -> str:
    rows = [
        (
            r.tokens,
            r.dtype,
            r.experts,
            r.mode,
            r.pass_,
            r.dense,
            r.ours,
            r.compiled,
            r.hf,
            r.floor,
            r.ours / r.dense,
            None if r.floor is None else r.ours / (r.dense + r.floor),
            None if r.hf is None else r.hf / r.ours,
            r.mem_ours,
            r.mem_hf,
            r.check,
        )
        for r in results
    ]
    table = harness.markdown_table(COLUMNS, rows)
    return table if header else "\n".join(table.splitlines()[2:])


def summarize(results: list[Result]) -> str:
    """The issue's targets, each as the worst case over the configurations measured."""
    train = [r for r in results if r.pass_ == "fwd+bwd"]
    small = [r.ours / r.dense for r in train if r.experts <= 32 and r.mode in ("cf1.0", "dropless")]
    large = [r for r in train if r.experts >= 128]
    floor = [r.ours / (r.dense + r.floor) for r in large if r.floor is not None]
    vs_hf = [r.hf / r.ours for r in large if r.hf is not None]
    mem = [r.mem_ours for r in train if r.mem_ours is not None]

    def line(name: str, values: list[float], worst: Callable[[list[float]], float], target: str) -> str:
        return f"- {name}: worst {worst(values):.2f} (target {target})" if values else f"- {name}: not measured"

    return "\n".join(
        [
            "targets (fwd+bwd, worst case over the grid):",
            line("ours / dense, <= 32 experts, cf1.0 and dropless", small, max, "<= 1.15"),
            line("ours / (dense + floor), >= 128 experts", floor, max, "<= 1.2"),
            line("transformers / ours, >= 128 experts", vs_hf, min, ">= 2"),
            line("peak activation memory ours / dense", mem, max, "<= 1.25"),
        ]
    )


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    harness.configure(threads=args.threads, huge_pages=not args.no_thp, keep_freed_memory=not args.system_malloc)
    print(harness.machine_summary())
    print(f"d_model {args.d_model}, d_ff {args.d_ff}, sequences of {args.seq_len}, medians of {args.repeats} rounds")
    print(format_rows([]), flush=True)
    results: list[Result] = []
    for tokens in args.tokens:
        for dtype_name in args.dtypes:
            for experts in args.experts:
                for mode in args.modes:
                    results += run_config(args, tokens, dtype_name, experts, mode)
    print("\n" + format_rows(results))
    print("\n" + summarize(results))


if __name__ == "__main__":
    main(sys.argv[1:])

"""One AdamW update of a whole model: torch's default CPU kernel against the fused one ``build_optimizer`` picks.

    python bench/bench_optimizer.py                          # compare's dense model and Switch-8 / 32 / 128
    python bench/bench_optimizer.py --experts 32 --threads 1

The models are those of ``switchformer compare`` (d_model 128, d_ff 512, 4 layers, vocabulary 4096, experts in
every other FFN), with random gradients. Sparse models hold most of their parameters in experts (34.6M at 128
experts against 1.3M dense), and every step updates all of them, so on CPU the update grows into a large share of
the step. `for-loop` is torch's default on CPU (``foreach`` and ``fused`` unset), `foreach` its multi-tensor
variant, `fused` one vectorised pass per tensor. The `check` column is the largest difference of any parameter
from the for-loop kernel's after the same timed updates (same start, same gradients).
"""

from __future__ import annotations

import argparse
import sys

import torch

import harness
from harness import Column, ms, ratio
from switchformer import build_model
from switchformer.experiments.plan import ComparePlan, plan_runs
from switchformer.training.optim import build_optimizer

KERNELS = {"for-loop": {"fused": None, "foreach": False}, "foreach": {"fused": None, "foreach": True}, "fused": {}}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = harness.argument_parser(__doc__, repeats=9)
    p.add_argument("--experts", nargs="+", type=int, default=[8, 32, 128], help="Switch models beside the dense one")
    return p.parse_args(argv)


def models(experts: list[int]) -> dict[str, torch.nn.Module]:
    plan = ComparePlan().replace(expert_counts=tuple(experts), capacity_factors=(), top2_experts=None, dense_seeds=(0,))
    return {run.name: build_model(run.model) for run in plan_runs(plan, plan.data.vocab_size)}


def bench_model(name: str, model: torch.nn.Module, repeats: int) -> list[tuple[object, ...]]:
    config = ComparePlan().train_config(0)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    gradients = [torch.randn(p.shape, generator=g) * 1e-3 for p in model.parameters()]
    replicas, steps = {}, {}
    for kernel, flags in KERNELS.items():
        replica = build_model_like(model, start)
        for p, grad in zip(replica.parameters(), gradients, strict=True):
            p.grad = grad.clone()
        optimizer = build_optimizer(replica, config)
        for group in optimizer.param_groups:
            group.update(flags)
        replicas[kernel], steps[kernel] = replica, optimizer.step
    times = harness.interleaved_medians(steps, repeats=repeats, warmup=1)
    reference = list(replicas["for-loop"].parameters())
    params = sum(p.numel() for p in reference)
    rows = []
    for kernel in KERNELS:
        pairs = zip(replicas[kernel].parameters(), reference, strict=True)
        check = max(float((a - b).detach().abs().max()) for a, b in pairs)
        rows.append((name, params / 1e6, kernel, times[kernel], times["for-loop"] / times[kernel], check))
    return rows


def build_model_like(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    replica = type(model)(model.config)
    replica.load_state_dict(state)
    return replica


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    harness.configure(threads=args.threads, huge_pages=True)
    print(harness.machine_summary())
    rows = [row for name, model in models(args.experts).items() for row in bench_model(name, model, args.repeats)]
    columns = [
        Column("model"),
        Column("params M", lambda v: f"{v:.2f}"),
        Column("kernel"),
        Column("update ms", ms),
        Column("speedup vs for-loop", ratio),
        Column("check", lambda v: f"{v:.1e}"),
    ]
    print(f"medians of {args.repeats} rounds")
    print(harness.markdown_table(columns, rows))


if __name__ == "__main__":
    main(sys.argv[1:])

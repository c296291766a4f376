"""Whole training steps of a tiny Switch model (32 experts) against its FLOP-matched dense model, tokens/s.

    python bench/bench_training_step.py
    python bench/bench_training_step.py --sparse switch-tiny-8 --batch 32
    python bench/bench_training_step.py --compile inductor    # also both models with compiled blocks

One step = forward, backward, gradient clipping at 1.0 (as the trainer does) and an AdamW update, on the same
batch of random tokens for both models, round by round in one process (see ``harness.interleaved_medians``).
Two AdamW kernels are measured: torch's CPU default (a per-tensor loop of elementwise ops) and ``fused=True`` (one
pass over each tensor, what the trainer's ``build_optimizer`` picks since 2026-12-02); the Switch model has 8x the
parameters, so the optimizer's memory traffic shows. ``--compile`` adds a twin of each model (same initial weights)
whose blocks are compiled for training (``TrainConfig.compile``), with fused AdamW; compile time is excluded (the
warm-up steps compile).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

import harness
from harness import Column, ms, ratio
from switchformer import build_model, get_preset
from switchformer.training.compiled import compile_blocks
from switchformer.training.config import TrainConfig
from switchformer.training.optim import build_optimizer


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = harness.argument_parser(__doc__, repeats=5)
    p.add_argument("--sparse", default="switch-tiny-32")
    p.add_argument("--dense", default="t5-tiny", help="the sparse preset's FLOP-matched dense model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--target-len", type=int, default=64)
    p.add_argument("--no-thp", action="store_true", help="leave PyTorch's transparent-huge-page allocation off")
    p.add_argument("--system-malloc", action="store_true", help="let glibc return freed memory (see harness)")
    p.add_argument("--compile", metavar="BACKEND", help="also time compiled blocks with this torch.compile backend")
    return p.parse_args(argv)


def make_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, labels: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        loss = model(ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def adamw(model: torch.nn.Module, config: TrainConfig, kind: str) -> torch.optim.Optimizer:
    """``build_optimizer``'s AdamW (same groups and settings), fused or with torch's CPU default kernel."""
    optimizer = build_optimizer(model, config)
    if kind == "default":
        for group in optimizer.param_groups:
            group.update(fused=None, foreach=False)
    return optimizer


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    harness.configure(threads=args.threads, huge_pages=not args.no_thp, keep_freed_memory=not args.system_malloc)
    print(harness.machine_summary())
    config = TrainConfig()
    kinds = ["default", "fused", *(["compiled"] if args.compile else [])]
    models = {}
    for name in (args.dense, args.sparse):
        torch.manual_seed(0)
        models[name] = build_model(get_preset(name)).train()
        if args.compile:
            torch.manual_seed(0)
            models[f"{name} compiled"] = build_model(get_preset(name)).train()
            compile_blocks(models[f"{name} compiled"], args.compile)
    vocab = models[args.dense].config.vocab_size
    ids = torch.randint(2, vocab, (args.batch, args.input_len))
    labels = torch.randint(2, vocab, (args.batch, args.target_len))
    cases: dict[str, Callable[[], object]] = {}
    for name in (args.dense, args.sparse):
        for kind in kinds:
            model = models[f"{name} compiled" if kind == "compiled" else name]
            optimizer = adamw(model, config, "fused" if kind == "compiled" else kind)
            cases[f"{name}, AdamW {kind}"] = make_step(model, optimizer, ids, labels)
    times = harness.interleaved_medians(cases, repeats=args.repeats, warmup=2)

    tokens = args.batch * (args.input_len + args.target_len)
    params = {name: sum(p.numel() for p in models[name].parameters()) / 1e6 for name in (args.dense, args.sparse)}
    print(f"{tokens} tokens a step ({args.batch} x ({args.input_len} + {args.target_len})), medians of {args.repeats}")
    columns = [
        Column("optimizer"),
        Column(f"{args.dense} ms ({params[args.dense]:.1f}M params)", ms),
        Column(f"{args.sparse} ms ({params[args.sparse]:.1f}M params)", ms),
        Column(f"{args.dense} tokens/s", lambda v: f"{v:.0f}"),
        Column(f"{args.sparse} tokens/s", lambda v: f"{v:.0f}"),
        Column("sparse / dense tokens/s", ratio),
    ]
    rows = []
    for kind in kinds:
        dense_s, sparse_s = times[f"{args.dense}, AdamW {kind}"], times[f"{args.sparse}, AdamW {kind}"]
        label = f"AdamW fused, blocks compiled ({args.compile})" if kind == "compiled" else f"AdamW {kind}"
        rows.append((label, dense_s, sparse_s, tokens / dense_s, tokens / sparse_s, dense_s / sparse_s))
    print(harness.markdown_table(columns, rows))
    print("target: sparse / dense tokens/s >= 0.85")


if __name__ == "__main__":
    main(sys.argv[1:])

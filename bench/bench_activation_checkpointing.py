"""Activation checkpointing: peak activation memory and fwd+bwd time of a Switch model, against no checkpointing.

    python bench/bench_activation_checkpointing.py
    python bench/bench_activation_checkpointing.py --preset switch-base-8 --batch 4 --every 0 1

``--every N`` recomputes every N-th block in the backward pass (``TrainConfig.activation_checkpointing``; 0 = off,
the baseline). Each case is one forward + backward of the same batch from the same RNG state, in training mode
(router jitter, and the preset's dropout if any), so `check` (the largest relative difference of the loss and
every gradient from the baseline's, measured before timing) should be rounding only. `peak MiB` is the peak of
bytes the allocator held during the step beyond the weights, less the weight gradients (``harness``): activations
and temporaries.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

import harness
from harness import Column, ms, ratio
from switchformer import build_model, get_preset
from switchformer.models.stack import set_activation_checkpointing


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = harness.argument_parser(__doc__, repeats=5)
    p.add_argument("--preset", default="switch-tiny-32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--target-len", type=int, default=64, help="decoder length (ignored by a decoder-only preset)")
    p.add_argument("--every", type=int, nargs="+", default=[0, 2, 1], help="checkpoint settings; 0 is the baseline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the router stays float32)")
    p.add_argument("--chunked-loss", action="store_true", help="the loss without [tokens, vocabulary] logits")
    return p.parse_args(argv)


def make_step(
    model: torch.nn.Module, every: int, batch: dict[str, torch.Tensor], amp: bool, logits: bool
) -> Callable[[], list[torch.Tensor]]:
    def step() -> list[torch.Tensor]:
        set_activation_checkpointing(model, every)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout and jitter noise in every case
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(**batch, return_logits=logits).loss
        loss.backward()
        return [loss.detach().float()] + [p.grad.float() for p in model.parameters() if p.grad is not None]

    return step


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if 0 not in args.every:
        raise SystemExit("--every must include 0: the baseline without checkpointing")
    harness.configure(threads=args.threads, huge_pages=True)
    print(harness.machine_summary())
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(get_preset(args.preset)).to(device).train()
    config = model.config
    vocab = config.vocab_size
    ids = torch.randint(2, vocab, (args.batch, args.input_len), device=device)
    target_len = args.target_len if config.is_encoder_decoder else args.input_len
    labels = ids.clone() if not config.is_encoder_decoder else torch.randint(2, vocab, (args.batch, target_len))
    batch = {"input_ids": ids, "labels": labels.to(device)}
    logits = not args.chunked_loss
    cases = {f"every {n}" if n else "off": make_step(model, n, batch, args.bf16, logits) for n in args.every}
    baseline = "off"
    params = list(model.parameters())

    reference = cases[baseline]()
    checks = {name: harness.largest_relative_difference(step(), reference) for name, step in cases.items()}
    peak = harness.peak_cuda_activation_bytes if device.type == "cuda" else harness.peak_activation_bytes
    memory = {name: peak(step, params) for name, step in cases.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = harness.interleaved_medians(cases, repeats=args.repeats, warmup=1, sync=sync)

    layers = f"{config.num_layers}+{config.decoder_layers}" if config.is_encoder_decoder else f"{config.num_layers}"
    print(
        f"{args.preset} ({layers} blocks, {sum(p.numel() for p in params) / 1e6:.1f}M params), batch {args.batch} x "
        f"{args.input_len}" + (f" + {target_len}" if config.is_encoder_decoder else "")
        + f" tokens, {'bf16 autocast' if args.bf16 else 'float32'} on {device}"
        + (", chunked loss" if args.chunked_loss else "") + f", medians of {args.repeats} rounds"
    )  # fmt: skip
    columns = [
        Column("checkpointing"),
        Column("fwd+bwd ms", ms),
        Column("time vs off", ratio),
        Column("peak MiB", lambda v: f"{float(v) / 2**20:.0f}"),  # type: ignore[arg-type]
        Column("memory vs off", ratio),
        Column("check", lambda v: f"{float(v):.1e}"),  # type: ignore[arg-type]
    ]
    rows = [
        (name, times[name], times[name] / times[baseline], memory[name], memory[name] / memory[baseline], checks[name])
        for name in cases
    ]
    print(harness.markdown_table(columns, rows))


if __name__ == "__main__":
    main(sys.argv[1:])

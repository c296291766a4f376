"""A Switch layer in a training loop of one's own: no allocator settings, gradients dropped as ``zero_grad()`` does.

    python bench/bench_plain_loop.py                    # four conditions twice, about 15 minutes on 2 idle cores
    python bench/bench_plain_loop.py --conditions out-of-the-box --repeats 9

The other bench scripts set up the process first (``harness.configure``: glibc keeps freed memory, PyTorch backs
large tensors with transparent huge pages). A library user's loop does not, so this one measures what that user
gets. ``SwitchFFN(d_model=512, d_ff=2048, num_experts=E, dropless=True)`` (router jitter off, so outputs can be
checked), 8 x 512 tokens, forward and backward of ``(y * g).sum()`` plus the auxiliary losses, gradients set to
``None`` before each step; transformers' ``SwitchTransformersSparseMLP`` holds the same weights with a capacity of
a whole sequence (nothing dropped), the dense FFN has one expert's shape. Ratios: transformers / ours at 128
experts (above 1: ours faster), ours / dense at 32 experts (above 1: ours slower).

Each condition runs in a fresh interpreter with its own environment, since glibc reads its settings at start-up
and PyTorch its huge-page switch at the first large allocation:

- ``out-of-the-box``: no allocator variables; what ``pip install switchformer`` gives (a Switch layer, when built,
  tells glibc to keep freed memory: ``switchformer.host_memory``).
- ``switch-off``: ``SWITCHFORMER_KEEP_FREED_MEMORY=0``, glibc's defaults (what a user got before the layer did so).
- ``bench-settings``: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2**40 THP_MEM_ALLOC_ENABLE=1``, the conditions
  of ``bench/README.md``'s tables.
- ``huge-pages``: out of the box plus ``THP_MEM_ALLOC_ENABLE=1``, which tells the huge pages' share apart.

The conditions run ``--rounds`` times in alternating order (A B C C B A ...), one row each, so the spread between
processes shows. Before timing it waits (up to ``--max-wait`` seconds) for the 1-minute load average to fall below
``--quiet``, and prints the load at the start and the end of each condition.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import harness
from bench_switch_layer import build_hf, check_against_hf, train_fn
from harness import Column, ms, ratio
from switchformer import SwitchFFN
from switchformer.host_memory import ENVIRONMENT_SWITCH
from switchformer.layers.activation import Activation
from switchformer.layers.feed_forward import DenseFFN

ALLOCATOR_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "THP_MEM_ALLOC_ENABLE", ENVIRONMENT_SWITCH)
CONDITIONS: dict[str, dict[str, str]] = {
    "out-of-the-box": {},
    "switch-off": {ENVIRONMENT_SWITCH: "0"},
    "bench-settings": {**harness.KEEP_FREED_MEMORY, "THP_MEM_ALLOC_ENABLE": "1"},
    "huge-pages": {"THP_MEM_ALLOC_ENABLE": "1"},
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = harness.argument_parser(__doc__, repeats=5)
    p.add_argument("--conditions", nargs="+", choices=sorted(CONDITIONS), default=list(CONDITIONS))
    p.add_argument("--rounds", type=int, default=2, help="run the conditions this many times, in alternating order")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--quiet", type=float, default=0.5, help="1-minute load average to wait for before timing")
    p.add_argument("--max-wait", type=float, default=1200, help="seconds to wait for it before measuring anyway")
    p.add_argument("--child", choices=sorted(CONDITIONS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict[str, object]:
    """One condition, in this process: both comparisons, interleaved medians, then the load average."""
    torch.set_num_threads(args.threads)
    d, f = args.d_model, args.d_ff
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq_len, d)
    grad = torch.randn_like(x)
    out: dict[str, object] = {"load_start": os.getloadavg()[0]}

    ours = SwitchFFN(d_model=d, d_ff=f, num_experts=128, dropless=True, router_jitter=0.0)
    hf = build_hf(ours, args.seq_len)
    out["check"] = check_against_hf(ours, hf, x)
    cases: dict[str, Callable[[], object]] = {"ours-128": train_fn(ours, x, grad)}
    if hf is not None:
        cases["transformers-128"] = train_fn(hf, x, grad)
    out |= timed(cases, [ours, hf], args.repeats)
    del ours, hf, cases

    ours = SwitchFFN(d_model=d, d_ff=f, num_experts=32, dropless=True, router_jitter=0.0)
    dense = DenseFFN(d, f, Activation.RELU)
    dense.reset_parameters(init_scale=0.1)
    out |= timed({"ours-32": train_fn(ours, x, grad), "dense": train_fn(dense, x, grad)}, [ours, dense], args.repeats)
    out["load_end"] = os.getloadavg()[0]
    out["machine"] = harness.machine_summary()
    return out


def timed(cases: dict[str, Callable[[], object]], modules: list[torch.nn.Module | None], repeats: int) -> dict:
    def drop_grads() -> None:  # what zero_grad() does: the next backward allocates fresh gradients
        for module in modules:
            for p in module.parameters() if module is not None else ():
                p.grad = None

    return harness.interleaved_medians(cases, repeats=repeats, before_each=drop_grads)


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Seconds waited until the 1-minute load average fell below ``threshold`` (gives up after ``max_wait``)."""
    start = time.monotonic()
    while os.getloadavg()[0] >= threshold and time.monotonic() - start < max_wait:
        time.sleep(15)
    return time.monotonic() - start


def run_condition(name: str, argv: list[str]) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARIABLES} | CONDITIONS[name]
    command = [sys.executable, __file__, *argv, "--child", name]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"condition {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


COLUMNS = [
    Column("condition"),
    Column("ours ms (128)", ms),
    Column("transformers ms (128)", ms),
    Column("transformers / ours (128)", ratio),
    Column("ours ms (32)", ms),
    Column("dense ms", ms),
    Column("ours / dense (32)", ratio),
    Column("load start-end"),
    Column("check"),
]


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return
    waited = wait_for_quiet(args.quiet, args.max_wait)
    print(f"waited {waited:.0f} s for a 1-minute load average below {args.quiet}; {harness.machine_summary()}")
    shape = {"repeats": args.repeats, "threads": args.threads, "batch": args.batch, "seq-len": args.seq_len}
    shape |= {"d-model": args.d_model, "d-ff": args.d_ff}
    forwarded = [item for key, value in shape.items() for item in (f"--{key}", str(value))]
    rows, machine = [], ""
    order = [name for i in range(args.rounds) for name in (args.conditions[:: -1 if i % 2 else 1])]
    for name in order:
        r = run_condition(name, forwarded)
        hf = r.get("transformers-128")
        rows.append(
            (
                name,
                r["ours-128"],
                hf,
                None if hf is None else hf / r["ours-128"],
                r["ours-32"],
                r["dense"],
                r["ours-32"] / r["dense"],
                f"{r['load_start']:.1f}-{r['load_end']:.1f}",
                r["check"],
            )
        )
        machine = str(r["machine"])
        print(f"{name}: done", flush=True)
    print(f"fwd+bwd, medians of {args.repeats} interleaved rounds; last condition's process: {machine}")
    print(harness.markdown_table(COLUMNS, rows))


if __name__ == "__main__":
    main(sys.argv[1:])

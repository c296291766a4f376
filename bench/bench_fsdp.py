"""Sharded training on CPU processes: tokens/s, memory and traffic per rank of each layout against replication.

    python bench/bench_fsdp.py [--steps 4] [--world-sizes 2 4] [--preset switch-tiny-32] [--batch 16] [--seq 128]

For each world size W it runs the same training steps (AdamW, the same global batch, gloo, one thread a rank)
under several layouts and prints, per layout, tokens/s (the median step), the bytes of weights, gradients and
optimizer state one rank holds, its peak resident memory, and the bytes its collectives moved per step (what it
sent and received: FSDP2's all-gathers and reduce-scatters, the all-to-alls, the small all-reduces), with the
ratio of each figure to the replicated layout (``dp_replicate = W``: every rank holds the whole model, as data
parallelism without sharding does) measured in the same run. One process on one thread runs first as the
single-device baseline. On a 2-core machine 4 ranks share 2 cores, so their tokens/s says little; memory and
traffic do not depend on the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_summary

LAYOUTS = {  # name -> (dp_replicate, dp_shard, expert_parallel) as fractions of W: -1 fills the world
    "replicated": ("W", 1, 1),
    "fsdp": (1, "W", 1),
    "expert-parallel": (1, 1, "W"),
    "fsdp x expert-parallel": (1, "W/2", 2),  # each expert slice sharded over W/2 ranks
}


def _dims(layout: str, world: int) -> tuple[int, int, int]:
    def size(value: Any) -> int:
        return world if value == "W" else world // 2 if value == "W/2" else int(value)

    return tuple(size(v) for v in LAYOUTS[layout])  # type: ignore[return-value]


class _Traffic:
    """Bytes this rank's collectives sent and received (input plus output buffers)."""

    NAMES = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_to_all_single", "broadcast")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.bytes = 0
        self.counting = False
        for name in self.NAMES:
            setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.counting:
                self.bytes += sum(a.numel() * a.element_size() for a in args[:2] if isinstance(a, torch.Tensor))
            return fn(*args, **kwargs)

        return counted


def _worker(rank: int, world: int, port: int, layout: str | None, options: dict[str, Any], out: str) -> None:
    env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({key: str(value) for key, value in env.items()})
    torch.set_num_threads(1)
    from switchformer import build_model, get_preset
    from switchformer.training.strategy import DistributedStrategy, SingleProcess

    traffic = _Traffic() if layout else None
    strategy: SingleProcess = SingleProcess()
    if layout:
        from switchformer.parallel import ParallelDims, init_parallel

        replicate, shard, ep = _dims(layout, world)
        strategy = DistributedStrategy(
            init_parallel(ParallelDims(dp_replicate=replicate, dp_shard=shard, expert_parallel=ep))
        )
    config = get_preset(options["preset"]).with_overrides(["dropout=0", "moe.router_jitter=0"])
    model = strategy.prepare_model(build_model(config, device="meta"), device=torch.device("cpu"), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batch, seq = options["batch"], options["seq"]
    tokens = batch * (seq + seq // 4)
    times = []
    for step in range(options["steps"] + 1):
        ids = torch.randint(2, config.vocab_size, (batch, seq), generator=generator)
        labels = torch.randint(2, config.vocab_size, (batch, seq // 4), generator=generator)
        local = strategy.local_batch({"input_ids": ids, "labels": labels})
        if traffic is not None:
            traffic.counting = step == 1  # one whole step after the warm-up
        started = time.perf_counter()
        model(local["input_ids"], labels=local["labels"]).loss.backward()
        strategy.clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - started)
    if traffic is not None:
        traffic.counting = False

    def local_bytes(tensors: Any) -> int:
        return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * 4 for t in tensors)

    state = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    result = {
        "rank": rank,
        "tokens_per_second": tokens / statistics.median(times),
        "weights": local_bytes(model.parameters()),
        "optimizer": local_bytes(state),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "traffic": traffic.bytes if traffic is not None else 0,
    }
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    if layout:
        from switchformer.parallel import close_parallel

        close_parallel()


def _run(world: int, layout: str | None, options: dict[str, Any]) -> list[dict[str, Any]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, port, layout, options, out), nprocs=world, start_method="spawn")
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--preset", default="switch-tiny-32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    options = {"preset": args.preset, "steps": args.steps, "batch": args.batch, "seq": args.seq}
    print(f"# bench_fsdp: {args.preset}, global batch {args.batch} x {args.seq} (+{args.seq // 4} targets), AdamW")
    print(f"# {machine_summary()}")
    one = _run(1, None, options)[0]
    mib = 2**20
    state = (2 * one["weights"] + one["optimizer"]) / mib
    print(
        f"one process, 1 thread: {one['tokens_per_second']:.0f} tokens/s, weights + grads + AdamW {state:.1f} MiB, "
        f"peak RSS {one['peak_rss'] / mib:.0f} MiB"
    )
    header = [
        "ranks",
        "layout (replicate/shard/ep)",
        "tokens/s",
        "weights + grads + AdamW a rank (MiB)",
        "peak RSS a rank (MiB)",
        "collective bytes a rank per step (MiB)",
    ]
    print("| " + " | ".join(header) + " |")
    print("|---:|---|---:|---:|---:|---:|")
    for world in args.world_sizes:
        base: dict[str, float] = {}
        for layout in LAYOUTS:
            ranks = _run(world, layout, options)
            figures = {
                "tokens": statistics.median(r["tokens_per_second"] for r in ranks),
                "state": max(2 * r["weights"] + r["optimizer"] for r in ranks),
                "rss": max(r["peak_rss"] for r in ranks),
                "traffic": max(r["traffic"] for r in ranks),
            }
            base = base or figures
            cells = [f"{figures['tokens']:.0f} ({figures['tokens'] / base['tokens']:.2f}x)"]
            cells += [f"{figures[k] / mib:.1f} ({figures[k] / base[k]:.2f}x)" for k in ("state", "rss", "traffic")]
            print(f"| {world} | {layout} ({'/'.join(map(str, _dims(layout, world)))}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Expert parallelism on CPU: training throughput of 2 processes (EP=2) against 1 process at the same global batch,
and the bytes all-to-all moves per step against the minimum.

    python bench/bench_expert_parallel.py [--steps 5] [--batch 16] [--seq 64] [--experts 8] [--dp-shard 1]

The ranks build the model as the trainer does (meta device, experts split over the ``ep`` mesh dimension, FSDP2
over the rest, each rank materialising its shards); ``--dp-shard N`` adds N-way sharding (2N processes).

The single process runs with one thread and with every core (``torch.get_num_threads()``), each of the 2 ranks
with half of the cores, so both sides use the same hardware; the speed-up is against the faster single process.
The minimum traffic is each kept claim's hidden state sent once and its result returned once, forward and again
backward; a capacity-padded all-to-all (Mesh-TF, GShard) moves ``groups * experts * capacity`` rows each way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from switchformer import ModelConfig, MoEConfig, build_model
from switchformer.models.config import Architecture
from switchformer.moe.assignment import Routing
from switchformer.parallel import AllToAllDispatcher, ParallelDims, close_parallel, init_parallel, slice_global_batch
from switchformer.training.strategy import DistributedStrategy


@dataclasses.dataclass
class Traffic:
    """Rows one rank put into all-to-all buffers during the forward pass (the backward mirrors them)."""

    sent_rows: int = 0  # dispatch: kept claims sent out (including those whose expert is on this rank)
    remote_rows: int = 0  # of those, rows that crossed to another rank
    kept_claims: int = 0  # the minimum: each kept claim must reach its expert once
    padded_rows: int = 0  # what a capacity-padded all-to-all would send (groups * experts * capacity)
    count_bytes: int = 0  # the token-count exchange before each dispatch


class CountingDispatcher(AllToAllDispatcher):
    def __init__(self, base: AllToAllDispatcher, traffic: Traffic) -> None:
        super().__init__(base.shard, group=base.group, kernel=base.kernel)
        self.traffic = traffic

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        batch, state = super().dispatch(x_TD, routing)
        t = self.traffic
        t.sent_rows += sum(state.send_splits)
        t.remote_rows += sum(n for j, n in enumerate(state.send_splits) if j != self.shard.ep_rank)
        t.kept_claims += int(routing.keep.sum())
        capacity = routing.capacity if routing.capacity is not None else routing.keep.shape[0]
        t.padded_rows += routing.num_groups * self.shard.num_experts * capacity
        t.count_bytes += 8 * self.shard.num_experts
        return batch, state


def model_config(args: argparse.Namespace) -> ModelConfig:
    moe = MoEConfig(num_experts=args.experts, grouping="sequence", router_jitter=0.0)
    return ModelConfig(
        architecture=Architecture.DECODER_ONLY,
        vocab_size=1024,
        d_model=args.d_model,
        d_ff=4 * args.d_model,
        num_heads=4,
        num_layers=4,
        dropout=0.0,
        sparse_every=1,
        init_scale=0.1,
        moe=moe,
    )


def global_batches(args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(0, 1024, (args.batch, args.seq), generator=generator)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def train_steps(model, batches, args, layout=None) -> float:
    """Seconds per step over the timed steps (forward, backward with FSDP2's gradient reduction, AdamW)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i, batch in enumerate(batches):
        if i == args.warmup:
            started = time.perf_counter()
        data = slice_global_batch(batch, layout) if layout is not None else batch
        model(data["input_ids"], labels=data["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / args.steps


def rank_main(rank: int, world: int, port: int, out: str, args: argparse.Namespace, threads: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    layout = init_parallel(ParallelDims(dp_shard=args.dp_shard, expert_parallel=world // args.dp_shard))
    meta = build_model(model_config(args), device="meta")
    model = DistributedStrategy(layout).prepare_model(meta, device=layout.device, seed=0)
    traffic = Traffic()
    for module in model.modules():
        if isinstance(getattr(module, "dispatcher", None), AllToAllDispatcher):
            module.dispatcher = CountingDispatcher(module.dispatcher, traffic)
    seconds = train_steps(model, global_batches(args), args, layout)
    steps = args.warmup + args.steps
    per_step = {k: v / steps for k, v in dataclasses.asdict(traffic).items()}
    torch.save({"seconds": seconds, "traffic": per_step}, Path(out) / f"rank{rank}.pt")
    close_parallel()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--dp-shard", type=int, default=1, help="FSDP2 shard degree beside EP=2 (world = 2 x N)")
    args = parser.parse_args()
    cores = torch.get_num_threads()
    world = 2 * args.dp_shard
    tokens = args.batch * args.seq

    singles = {}
    for threads in sorted({1, cores}):  # on a busy machine one thread can beat all cores; compare with the best
        torch.set_num_threads(threads)
        singles[threads] = train_steps(build_model(model_config(args), seed=0), global_batches(args), args)
    torch.set_num_threads(cores)
    best = min(singles.values())

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(rank_main, args=(world, free_port(), out, args, max(cores // world, 1)), nprocs=world)
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]
    ep_seconds = max(r["seconds"] for r in ranks)
    traffic = {k: sum(r["traffic"][k] for r in ranks) for k in ranks[0]["traffic"]}

    row_bytes = args.d_model * 4  # float32 hidden states
    # Forward: rows out (dispatch) and back (combine); backward: the same two exchanges reversed.
    moved = 4 * traffic["sent_rows"] * row_bytes
    remote = 4 * traffic["remote_rows"] * row_bytes
    minimum = 4 * traffic["kept_claims"] * row_bytes
    padded = 4 * traffic["padded_rows"] * row_bytes
    counts = traffic["count_bytes"]
    load = os.getloadavg()[0]
    print(f"global batch {args.batch} x {args.seq} = {tokens} tokens, {args.experts} experts, d_model {args.d_model}")
    print(f"{cores} cores, load average {load:.1f} (timings on a busy machine are noisy)")
    print(f"{'setup':<42}{'s/step':>10}{'tokens/s':>12}{'vs best 1-process':>19}")
    for threads, seconds in singles.items():
        label = f"1 process, {threads} thread{'s' if threads > 1 else ''}"
        print(f"{label:<42}{seconds:>10.4f}{tokens / seconds:>12.0f}{best / seconds:>19.2f}")
    label = f"{world} processes EP=2 x FSDP={args.dp_shard}, {max(cores // world, 1)} thread each"
    print(f"{label:<42}{ep_seconds:>10.4f}{tokens / ep_seconds:>12.0f}{best / ep_seconds:>19.2f}")
    print()
    print(f"{'all-to-all bytes per training step, all ranks':<44}{'bytes':>12}{'x minimum':>11}")
    for name, value in (
        ("minimum (each kept claim out and back)", minimum),
        ("moved by the all-to-all buffers", moved),
        ("  of which crossed between ranks", remote),
        ("token-count exchange", counts),
        ("a capacity-padded all-to-all would move", padded),
    ):
        print(f"{name:<44}{value:>12.0f}{value / max(minimum, 1):>11.2f}")


if __name__ == "__main__":
    main()

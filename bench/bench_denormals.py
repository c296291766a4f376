"""A training step of a partly trained model with denormal floats computed as they are, and flushed to zero.

    python bench/bench_denormals.py                          # trains the quickstart model 250 steps first (~5 min)
    python bench/bench_denormals.py --run runs/switch-tiny-8-20261203-101500 --threads 1

As a model trains, its softmaxes grow peaky and some probabilities fall below float32's smallest normal number
into the denormal range, which x86 cores compute on a slow path; ``switchformer`` flushes them to zero on CPU
(``training/denormals.py``). This times one forward and backward (what a training step spends besides the
optimizer) on a validation batch, for the trained checkpoint and for a freshly initialised model of the same
config (which has few denormals, so it shows what the flush costs when there is nothing to gain), each with and
without the flush. The flag is per thread and reaches torch's intra-op threads only if set before they start, so
every measurement runs in its own interpreter (seeded alike: same weights, same dropout); rounds alternate the
cases, and medians are reported. The `loss` column shows whether flushing changes the result; `denormals written`
counts, over one more pass, the float32 denormals every op writes, which says how much there is to gain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import Column, ratio

CASES = [("trained", False), ("trained", True), ("initialised", False), ("initialised", True)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="run folder or checkpoint to time (default: train one first)")
    p.add_argument("--train-steps", type=int, default=250, help="steps of `switchformer train` when --run is unset")
    p.add_argument("--rounds", type=int, default=3, help="interpreters per case")
    p.add_argument("--repeats", type=int, default=5, help="timed forward+backward passes per interpreter")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("MODEL", "FLUSH"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure_in_this_process(run: Path, model_kind: str, flush: bool, repeats: int, threads: int) -> dict:
    """One case: set the flush before torch starts its threads, then time forward+backward on a validation batch."""
    from switchformer.training.denormals import flushed_denormals

    with flushed_denormals(enabled=flush):
        harness.configure(threads=threads, huge_pages=True)
        import torch

        from switchformer.data import DataConfig, prepare_data
        from switchformer.models.config import ModelConfig
        from switchformer.models.factory import build_model
        from switchformer.training.checkpoint import load_checkpoint, load_model_state, resolve_checkpoint
        from switchformer.training.evaluation import model_forward

        path = resolve_checkpoint(run)
        checkpoint = load_checkpoint(path, with_optimizer=False)
        torch.manual_seed(0)  # the same initialised weights and dropout masks in every interpreter
        model = build_model(ModelConfig.from_dict(checkpoint.config["model"]))
        if model_kind == "trained":
            load_model_state(model, checkpoint.model_state, source=path)
        model.train()
        batch = prepare_data(DataConfig.from_dict(checkpoint.config["data"]), path.parent.parent).validation[0]

        def step() -> float:
            torch.manual_seed(1)
            model.zero_grad(set_to_none=True)
            out = model_forward(model, batch, torch.device("cpu"), None)
            out.loss.backward()
            return float(out.loss)

        loss = step()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        counter = new_denormal_counter()
        with counter:
            step()
        return {"seconds": times, "loss": loss, "step": checkpoint.step, "machine": harness.machine_summary(),
                "denormals": counter.denormals, "values": counter.values}  # fmt: skip


def new_denormal_counter():
    """A dispatch mode that counts the float32 denormals every op writes (views of an input are not counted again).

    Defined here, not at import, because torch must not be imported before the case has set its flush.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    smallest_normal = torch.finfo(torch.float32).tiny

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.denormals = self.values = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32:
                    continue
                if tensor.untyped_storage().data_ptr() in inputs:
                    continue  # a view or an in-place result: its values were counted when written
                magnitude = tensor.detach().abs()
                self.denormals += int(((magnitude > 0) & (magnitude < smallest_normal)).sum())
                self.values += tensor.numel()
            return out

    return Counter()


def train_quickstart_model(steps: int, folder: Path) -> Path:
    run = folder / "run"
    command = ["switchformer", "train", "--steps", str(steps), "--output", str(run), "--no-progress"]
    print("training:", " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return run


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.child:  # a fresh interpreter for one case
        model_kind, flush = args.child[0], args.child[1] == "flush"
        print(json.dumps(measure_in_this_process(args.run, model_kind, flush, args.repeats, args.threads)))
        return
    harness.configure(threads=args.threads, huge_pages=True)  # the children inherit its environment
    with tempfile.TemporaryDirectory(prefix="bench-denormals-") as scratch:
        run = args.run or train_quickstart_model(args.train_steps, Path(scratch))
        samples: dict[tuple[str, bool], list[float]] = {case: [] for case in CASES}
        results: dict[tuple[str, bool], dict] = {}
        for round_index in range(args.rounds):
            shift = round_index % len(CASES)
            for model_kind, flush in CASES[shift:] + CASES[:shift]:
                mode = "flush" if flush else "plain"
                options = ["--run", str(run), "--repeats", str(args.repeats), "--threads", str(args.threads)]
                command = [sys.executable, __file__, *options, "--child", model_kind, mode]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                result = json.loads(output.strip().splitlines()[-1])
                samples[model_kind, flush].extend(result["seconds"])
                results[model_kind, flush] = result
    print(results["trained", True]["machine"])
    print(f"checkpoint {run} at step {results['trained', True]['step']}, {args.threads} threads, "
          f"{args.rounds} interpreters x {args.repeats} passes per case\n")  # fmt: skip
    columns = [Column("model"), Column("denormals"), Column("fwd+bwd ms (median)"), Column("range ms"),
               Column("plain / flushed", ratio), Column("loss"), Column("denormals written")]  # fmt: skip
    rows = []
    for model_kind, flush in CASES:
        times = samples[model_kind, flush]
        plain = statistics.median(samples[model_kind, False])
        rows.append((
            model_kind, "flushed" if flush else "computed", f"{statistics.median(times) * 1e3:.0f}",
            f"{min(times) * 1e3:.0f}-{max(times) * 1e3:.0f}", plain / statistics.median(times),
            f"{results[model_kind, flush]['loss']:.6f}",
            f"{results[model_kind, flush]['denormals']:,} of {results[model_kind, flush]['values'] / 1e6:,.0f}M",
        ))  # fmt: skip
    print(harness.markdown_table(columns, rows))


if __name__ == "__main__":
    main(sys.argv[1:])

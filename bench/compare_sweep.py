"""Run several ``switchformer compare`` plans side by side and tabulate each Switch run's speedup at several budgets.

This is how the defaults of ``ComparePlan`` are checked: on a many-core or GPU machine, variants of the plan train
at once (one process each), and the table says, for each budget N, how many fewer steps each Switch run needed
to reach the dense run's validation loss at step N. Curves are cut at N, so one long run answers every shorter
budget.

    python bench/compare_sweep.py --root runs/sweep --jobs 4 \\
        --common "--steps 3000 --seeds 0 --experts 8,32 --no-top2 --set capacity_factors= --set threads=2" \\
        --variant "default:" --variant "every-ffn:--set sparse_every=1" --variant "lr1e-3:--set lr=1e-3" \\
        --at 1000 1500 3000
    python bench/compare_sweep.py --root runs/sweep --at 1000 1500 3000 --table-only   # re-tabulate
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from switchformer.experiments.folder import RunKind
from switchformer.experiments.results import read_results
from switchformer.experiments.speedup import time_to_target


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="one comparison folder per variant goes here")
    p.add_argument("--variant", action="append", default=[], help="NAME:ARGS, ARGS added to `switchformer compare`")
    p.add_argument("--common", default="", help="arguments every variant gets")
    p.add_argument("--jobs", type=int, default=4, help="variants trained at once")
    p.add_argument("--at", type=int, nargs="+", default=[1500], help="budgets (steps) to tabulate")
    p.add_argument("--table-only", action="store_true", help="train nothing; tabulate the folders under --root")
    return p.parse_args(argv)


def launch(root: Path, variants: list[str], common: str, jobs: int) -> None:
    pending = list(variants)
    running: list[tuple[str, subprocess.Popen[bytes], float]] = []
    while pending or running:
        while pending and len(running) < jobs:
            name, _, extra = pending.pop(0).partition(":")
            folder = root / name
            folder.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "switchformer", "compare", "--output", str(folder), "--no-progress"]
            command += shlex.split(common) + shlex.split(extra)
            log = (root / f"{name}.log").open("wb")
            print(f"start {name}: {shlex.join(command[2:])}", flush=True)
            running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), time.time()))
        time.sleep(2)
        for item in list(running):
            name, process, start = item
            if process.poll() is not None:
                running.remove(item)
                print(f"done  {name}: exit {process.returncode} after {time.time() - start:.0f} s", flush=True)


def table(root: Path, budgets: list[int]) -> str:
    speedups = " | ".join(f"speedup @{n}" for n in budgets)
    lines = [
        f"| variant | run | {speedups} | loss @last | dense loss @last | dropped |",
        "|---|---|" + "---|" * len(budgets) + "---|---|---|",
    ]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        results = read_results(folder, common_step=False)
        dense = next((r for r in results if r.kind is RunKind.DENSE), None)
        if dense is None:
            continue
        for run in (r for r in results if r.kind is not RunKind.DENSE):
            cells = []
            for n in budgets:
                ref, cut = dense.up_to(n), run.up_to(n)
                if not ref.curve.steps or ref.curve.steps[-1] < n or not cut.curve.steps or cut.curve.steps[-1] < n:
                    cells.append("-")
                    continue
                speedup = time_to_target(cut.curve, ref.final_loss, ref.curve).step_speedup
                cells.append("never" if speedup is None else f"{speedup:.2f}x")
            last = min(dense.steps, run.steps)
            dropped = "-" if run.dropped_fraction is None else f"{run.dropped_fraction:.3f}"
            losses = f"{run.up_to(last).final_loss:.4f} | {dense.up_to(last).final_loss:.4f}"
            lines.append(f"| {folder.name} | {run.name} | {' | '.join(cells)} | {losses} | {dropped} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        launch(args.root, args.variant, args.common, args.jobs)
    print(table(args.root, args.at))


if __name__ == "__main__":
    main(sys.argv[1:])

"""The comparison's PNG plots: loss vs steps, loss vs time, speedup vs steps, final loss vs experts (Figure 4),
expert load; and a distilled student's curve against its control's."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from switchformer.experiments.folder import RunKind
from switchformer.experiments.results import RunResult, dense_noise, expert_sweep, growth_runs
from switchformer.experiments.speedup import speedup_curve

if TYPE_CHECKING:
    from switchformer.distill.run import DistillResult

DISTILL_PLOT = "distill.png"
_STYLE = {RunKind.DENSE: "-", RunKind.SWITCH: "-", RunKind.TOP2: "--", RunKind.DISTILLED: ":"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path, ax: Any = None, *, legend_size: int = 7) -> Path:
    """Finish a figure the same way everywhere: grid and legend on ``ax`` (if one is given), layout, PNG, close."""
    if ax is not None:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _zoom(ax: Any, results: Sequence[RunResult], reference: RunResult) -> None:
    """Leave out the first, steep quarter of the run so the region where the curves separate is readable."""
    low = min(min(r.curve.losses) for r in results)
    losses = reference.curve.losses
    high = max(losses[len(losses) // 4], max(r.final_loss for r in results) + 0.05)
    ax.set_ylim(low - 0.03 * (high - low), high)
    ax.axhline(reference.final_loss, color="gray", linestyle=":", linewidth=1, label="dense final loss")


def _curves(results: Sequence[RunResult], reference: RunResult, path: Path, *, by_time: bool) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        xs = r.curve.seconds if by_time else r.curve.steps
        width = 2.2 if r.name == reference.name else 1.4
        ax.plot(xs, r.curve.losses, _STYLE[r.kind], marker=".", linewidth=width, label=r.label)
    _zoom(ax, results, reference)
    ax.set_xlabel("training time (s, evaluation excluded)" if by_time else "step")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title("validation loss vs " + ("wall-clock time" if by_time else "steps"))
    return _save(plt, fig, path, ax)


def _growth(results: Sequence[RunResult], reference: RunResult, path: Path) -> Path | None:
    """Step speedup over the reference had the runs stopped at each of its evaluations: whether the sparse lead
    grows with training (the paper's speedups come from long runs), drawn instead of read off a table."""
    rows = growth_runs(results, reference)
    if not rows or len(reference.curve.steps) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        points = speedup_curve(r.curve, reference.curve)
        steps, speedups = [n for n, _ in points], [x for _, x in points]
        ax.plot(steps, speedups, _STYLE[r.kind], marker=".", linewidth=1.4, label=r.label)
    ax.axhline(1.0, color="gray", linestyle=":", linewidth=1, label=f"{reference.name} (1x)")
    ax.set_xlabel("step N")
    ax.set_ylabel(f"{reference.name}'s steps to its loss at N / the run's")
    ax.set_title("step speedup as training goes on")
    return _save(plt, fig, path, ax)


def _experts(results: Sequence[RunResult], reference: RunResult, path: Path) -> Path:
    """Figure 4 analogue: final loss against the number of experts at one capacity factor (dense = 1 expert)."""
    plt = _pyplot()
    sweep = expert_sweep(results, reference)
    points = sweep.points
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    label = f"Switch, capacity factor {sweep.capacity_factor}"
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    noise = dense_noise(results)
    if noise is not None:
        label = "dense, 2 std over seeds"
        ax.errorbar([1], [reference.final_loss], yerr=[2 * noise], fmt="none", capsize=4, color="black", label=label)
    top2 = [r for r in results if r.kind is RunKind.TOP2]
    for r in top2:
        ax.plot([r.num_experts], [r.final_loss], "s", color="tab:red", label=f"top-2, {r.num_experts} experts")
    ax.set_xscale("log", base=2)
    ax.set_xticks([p[0] for p in points], [str(p[0]) for p in points])
    ax.set_xlabel("experts (1 = dense)")
    ax.set_ylabel("final validation loss")
    ax.set_title("more experts at equal FLOPs per token")
    return _save(plt, fig, path, ax, legend_size=8)


def _load(results: Sequence[RunResult], path: Path) -> Path | None:
    """Per run, the share of tokens each expert got in each Switch layer (last logging interval), busiest first."""
    sparse = [r for r in results if r.load]
    if not sparse:
        return None
    plt = _pyplot()
    cols = min(3, len(sparse))
    rows = math.ceil(len(sparse) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, r in zip(axes.flat, sparse, strict=False):
        for layer, shares in r.load.items():
            ax.plot(range(len(shares)), sorted(shares, reverse=True), marker=".", label=layer)
        ax.axhline(1 / r.num_experts, color="gray", linestyle="--")
        dropped = f", {r.dropped_fraction:.1%} dropped" if r.dropped_fraction is not None else ""
        ax.set_title(f"{r.name}{dropped}", fontsize=9)
        ax.set_xlabel("expert (sorted by load)", fontsize=8)
        ax.set_ylabel("share of tokens", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(sparse) :]:
        ax.set_visible(False)
    fig.suptitle("expert load per layer at the last logged step (dashed: perfect balance)", fontsize=10)
    return _save(plt, fig, path)


def write_plots(
    results: Sequence[RunResult], reference: RunResult, folder: Path, *, whole: Sequence[RunResult] | None = None
) -> list[Path]:
    """Write the PNGs into ``folder``; returns the paths written (no speedup plot without a run to compare, no load
    plot without Switch runs). ``results`` are compared on one budget (final loss against experts, expert load);
    the curves and the speedup by step draw ``whole``, the runs as far as each has trained, if given."""
    folder.mkdir(parents=True, exist_ok=True)
    whole = whole or results
    whole_reference = next(r for r in whole if r.name == reference.name)
    paths = [
        _curves(whole, whole_reference, folder / "loss_vs_steps.png", by_time=False),
        _curves(whole, whole_reference, folder / "loss_vs_time.png", by_time=True),
        _growth(whole, whole_reference, folder / "speedup_vs_steps.png"),
        _experts(results, reference, folder / "loss_vs_experts.png"),
        _load(results, folder / "expert_load.png"),
    ]
    return [p for p in paths if p is not None]


def distillation_plot(folder: Path, result: DistillResult, path: Path | None = None) -> Path | None:
    """The student's validation loss against its control's (same start, no teacher), between the teacher's and the
    dense baseline's losses: where the soft targets help shows as the gap between the two curves. Written to
    ``path`` (default ``folder/distill.png``)."""
    # Both packages import their trainers; drawing a finished distillation needs neither until here.
    from switchformer.distill.run import CONTROL_DIR
    from switchformer.training.metrics import read_metrics

    curves = {"student (with teacher)": folder, "control (no teacher)": folder / CONTROL_DIR}
    logged = {label: [r for r in read_metrics(path) if "val_loss" in r] for label, path in curves.items()}
    if not any(logged.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, records), style in zip(logged.items(), ("-", "--"), strict=True):
        if records:
            ax.plot([r["step"] for r in records], [r["val_loss"] for r in records], style, marker=".", label=label)
    teacher, dense = f"teacher ({result.teacher_budget} steps)", f"dense from scratch ({result.baseline_budget} steps)"
    ax.axhline(result.teacher_loss, color="tab:green", linestyle=":", label=teacher)
    ax.axhline(result.dense_loss, color="gray", linestyle=":", label=dense)
    ax.set_xlabel("student step")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    title = f"distillation, teacher weight {result.teacher_weight:g}, init {result.student_init}"
    if result.student_overrides:
        title += "\nstudent settings: " + ", ".join(result.student_overrides)
    ax.set_title(title, fontsize=10)
    return _save(plt, fig, path or folder / DISTILL_PLOT, ax, legend_size=8)

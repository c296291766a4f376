"""End-of-run outputs people look at: a PNG of the loss curves and per-layer expert load, and a summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from switchformer.training.metrics import read_metrics


def plot_run(run_dir: Path) -> Path | None:
    """Write ``run_dir/training.png``: train and validation loss by step, and the expert load of each Switch layer.

    The load panel shows, per layer, the share of tokens each expert received over the last logging interval
    (sorted, so the busiest expert is on the left); a flat line at ``1/E`` is perfect balance.
    """
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routing = records[-1].get("routing", {})
    fig, axes = plt.subplots(1, 2 if routing else 1, figsize=(12 if routing else 6.5, 4.2), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", color="tab:blue")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy + aux (nats)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if routing:
        ax = axes[0][1]
        for layer, stats in routing.items():
            load = sorted(stats["load"], reverse=True)
            ax.plot(range(len(load)), load, marker=".", label=f"{layer} (max/mean {stats['max_load_ratio']:.2f})")
        experts = len(next(iter(routing.values()))["load"])
        ax.axhline(1 / experts, color="gray", linestyle="--", label="perfect balance")
        ax.set_xlabel("expert (sorted by load)")
        ax.set_ylabel("share of tokens")
        ax.set_title(f"expert load at step {records[-1]['step']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = run_dir / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_rows(summary: dict[str, Any], records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Rows of the end-of-run table (the CLI renders them with rich)."""
    rows = [("steps", str(summary["steps"]))]
    if summary.get("final_loss") is not None:
        rows.append(("final train loss", f"{summary['final_loss']:.4f}"))
    if summary.get("final_val_loss") is not None:
        rows.append(("final validation loss", f"{summary['final_val_loss']:.4f}"))
        rows.append(("validation perplexity", f"{summary['final_val_perplexity']:.2f}"))
    first_val = next((r["val_loss"] for r in records if "val_loss" in r), None)
    if first_val is not None and summary.get("final_val_loss") is not None and first_val != summary["final_val_loss"]:
        rows.append(("first evaluated validation loss", f"{first_val:.4f}"))
    rows.append(("tokens seen", f"{summary['tokens_seen']:,}"))
    rows.append(("training time", f"{summary['train_seconds']:.0f} s"))
    rows.append(("tokens / second", f"{summary['tokens_per_second']:,.0f}"))
    routing = records[-1].get("routing", {}) if records else {}
    if routing:
        worst = max(routing.items(), key=lambda kv: kv[1]["max_load_ratio"])
        rows.append(("busiest expert load / mean", f"{worst[1]['max_load_ratio']:.2f} ({worst[0]})"))
        rows.append(
            (
                "dropped tokens (last interval)",
                f"{sum(s['dropped_fraction'] for s in routing.values()) / len(routing):.2%}",
            )
        )
    if summary.get("last_checkpoint"):
        rows.append(("last checkpoint", summary["last_checkpoint"]))
    return rows

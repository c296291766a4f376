"""Per-step metrics: routing diagnostics, the JSON-lines log and TensorBoard."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from switchformer.models.outputs import LayerRouting
from switchformer.run_folder import METRICS_FILE, TENSORBOARD_DIR, atomic_write_text

logger = logging.getLogger(__name__)


class RoutingAccumulator:
    """Sums router statistics of each Switch layer over the micro-batches and steps of one logging interval."""

    def __init__(self) -> None:
        self.tokens: dict[str, torch.Tensor] = {}
        self.sums: dict[str, dict[str, float]] = {}
        self.count = 0

    def add(self, layers: list[LayerRouting]) -> None:
        self.count += 1
        for layer in layers:
            tokens = layer.stats.tokens_per_expert.detach().float().cpu()
            self.tokens[layer.name] = self.tokens.get(layer.name, torch.zeros_like(tokens)) + tokens
            sums = self.sums.setdefault(layer.name, {"dropped_fraction": 0.0, "entropy": 0.0, "confidence": 0.0})
            sums["dropped_fraction"] += float(layer.stats.dropped_fraction)
            sums["entropy"] += float(layer.stats.router_entropy)
            sums["confidence"] += float(layer.stats.router_confidence)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per layer: busiest expert's load over the mean, experts that got no token, entropy, drops, load shares."""
        out: dict[str, dict[str, Any]] = {}
        for name, tokens in self.tokens.items():
            total = float(tokens.sum())
            mean = total / max(tokens.numel(), 1)
            sums = self.sums[name]
            out[name] = {
                "max_load_ratio": float(tokens.max()) / mean if mean > 0 else 0.0,
                "idle_experts": int((tokens == 0).sum()),
                "router_entropy": sums["entropy"] / self.count,
                "router_confidence": sums["confidence"] / self.count,
                "dropped_fraction": sums["dropped_fraction"] / self.count,
                "load": [round(float(t) / total, 5) if total > 0 else 0.0 for t in tokens],
            }
        return out

    def reset(self) -> None:
        self.__init__()


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    On resume the log is cut back to the checkpoint's step, so a resumed run's log reads exactly like an
    uninterrupted one.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [record for record in read_metrics(run_dir) if record["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge)
            except ImportError:  # pragma: no cover - tensorboard is a dependency, but stay usable without it
                logger.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tb is None:
            return
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                self.tb.add_scalar(f"train/{key}" if not key.startswith("val") else f"eval/{key}", value, step)
        for layer, stats in record.get("routing", {}).items():
            for key in ("max_load_ratio", "idle_experts", "router_entropy", "dropped_fraction"):
                self.tb.add_scalar(f"routing/{layer}/{key}", stats[key], step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The logged records; a line cut short (a full disk, a kill mid-write) is skipped with a warning."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s line %d is not complete JSON (cut by a crash or a full disk); skipping it", path, number)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records

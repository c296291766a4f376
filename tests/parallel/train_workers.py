"""Rank functions that run the real `switchformer train` command inside a launched process group."""

from __future__ import annotations

from switchformer.cli.main import main
from switchformer.training.metrics import read_metrics


def train_cli(args: list[str], run_dir: str) -> list[dict]:
    code = main(["train", *args, "--output", run_dir])
    assert code == 0, f"switchformer train exited with {code}"
    return read_metrics(__import__("pathlib").Path(run_dir))


def distill_cli(args: list[str], output: str) -> dict[str, object]:
    """``switchformer distill`` on this rank: the logs of the student and of the runs trained beside it, and the
    batch sizes its training forward passes saw (data parallelism splits the global batch)."""
    from pathlib import Path

    from switchformer.training.trainer import Trainer

    rows: set[int] = set()
    forward = Trainer._forward

    def counting_forward(self, batch):
        rows.add(int(batch["labels"].shape[0]))
        return forward(self, batch)

    Trainer._forward = counting_forward
    try:
        code = main(["distill", *args, "--output", output])
    finally:
        Trainer._forward = forward
    assert code == 0, f"switchformer distill exited with {code}"
    folder = Path(output)
    logs = {name: read_metrics(folder / name) for name in (".", "dense-baseline", "no-teacher")}
    return {"logs": logs, "rows": rows}

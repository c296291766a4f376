"""Rank functions that run the real `switchformer train` command inside a launched process group."""

from __future__ import annotations

from switchformer.cli.main import main
from switchformer.training.metrics import read_metrics


def train_cli(args: list[str], run_dir: str) -> list[dict]:
    code = main(["train", *args, "--output", run_dir])
    assert code == 0, f"switchformer train exited with {code}"
    return read_metrics(__import__("pathlib").Path(run_dir))

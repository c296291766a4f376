"""Rank functions that run the real `switchformer train` command inside a launched process group."""

from __future__ import annotations

from switchformer.cli.main import main
from switchformer.training.metrics import read_metrics


def train_cli(args: list[str], run_dir: str) -> list[dict]:
    code = main(["train", *args, "--output", run_dir])
    assert code == 0, f"switchformer train exited with {code}"
    return read_metrics(__import__("pathlib").Path(run_dir))


def main_counting_rows(command: str, args: list[str], output: str) -> set[int]:
    """Run ``switchformer COMMAND ARGS --output OUTPUT``; return the batch sizes its training forward passes saw
    (data parallelism splits the global batch)."""
    from switchformer.training.trainer import Trainer

    rows: set[int] = set()
    forward = Trainer._forward

    def counting_forward(self, batch):
        rows.add(int(batch["labels"].shape[0]))
        return forward(self, batch)

    Trainer._forward = counting_forward
    try:
        code = main([command, *args, "--output", output])
    finally:
        Trainer._forward = forward
    assert code == 0, f"switchformer {command} exited with {code}"
    return rows


def distill_cli(args: list[str], output: str) -> dict[str, object]:
    """``switchformer distill`` on this rank: the logs of the student and of the runs trained beside it, and the
    batch sizes its training forward passes saw."""
    import dataclasses
    from pathlib import Path

    from switchformer.cli import distill as command

    returned = []
    library_distill = command.distill

    def recording_distill(*args, **kwargs):
        returned.append(library_distill(*args, **kwargs))
        return returned[-1]

    command.distill = recording_distill
    try:
        rows = main_counting_rows("distill", args, output)
    finally:
        command.distill = library_distill
    folder = Path(output)
    logs = {name: read_metrics(folder / name) for name in (".", "dense-baseline", "no-teacher")}
    return {"logs": logs, "rows": rows, "result": dataclasses.asdict(returned[0])}


def finetune_cli(args: list[str], output: str) -> dict[str, object]:
    """``switchformer finetune`` on this rank: the run's metrics, evaluations and best model's record as this rank
    reads them once the command has returned, the batch sizes its training forward passes saw and the number of
    validation examples it decoded."""
    import json
    from pathlib import Path

    import switchformer.finetune.evaluation as evaluation
    from switchformer import from_pretrained
    from switchformer.finetune.callbacks import read_eval_log

    decoded = [0]
    library_generate = evaluation.generate

    def counting_generate(model, *, input_ids, **kwargs):
        decoded[0] += int(input_ids.shape[0])
        return library_generate(model, input_ids=input_ids, **kwargs)

    evaluation.generate = counting_generate
    try:
        rows = main_counting_rows("finetune", args, output)
    finally:
        evaluation.generate = library_generate
    folder = Path(output)
    best = json.loads((folder / "best" / "best.json").read_text())
    weights = from_pretrained(folder / "best").state_dict()
    return {"metrics": read_metrics(folder), "evals": read_eval_log(folder), "best": best, "rows": rows,
            "best_weights": weights, "decoded": decoded[0]}  # fmt: skip

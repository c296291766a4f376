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
    weights = from_pretrained(folder / "best", dtype=None).state_dict()  # as saved
    return {
        "metrics": read_metrics(folder),
        "evals": read_eval_log(folder),
        "best": best,
        "rows": rows,
        "best_weights": weights,
        "decoded": decoded[0],
    }


def train_cli_holding_async_writes(args: list[str], run_dir: str) -> dict[str, object]:
    """``switchformer train`` on this rank, each asynchronous checkpoint write held back until training has taken
    its next step (the optimizer has updated the weights in place) or the run waits for the write (its last
    checkpoint): what is written must still be the state of the step saved. Returns what released each write."""
    import threading

    import torch.distributed.checkpoint as dcp

    from switchformer.training.sharded_checkpoint import ShardedCheckpointer
    from switchformer.training.trainer import Trainer

    stepped, holding, released = threading.Event(), [False], []
    real_write, real_step = dcp.FileSystemWriter.write_data, Trainer.train_step
    real_save, real_wait = ShardedCheckpointer.save, ShardedCheckpointer.wait

    def release(reason: str) -> None:
        if holding[0]:
            released.append(reason)
            holding[0] = False
            stepped.set()

    def write_data(self, plan, planner):
        assert stepped.wait(timeout=120), "the held write was never released"
        return real_write(self, plan, planner)

    def wait(self):
        if self.pending is not None:
            release("wait")
        return real_wait(self)

    def save(self, *args, **kwargs):
        self.wait()  # the previous save first (the real save does that too), then hold this one
        stepped.clear()
        holding[0] = True
        return real_save(self, *args, **kwargs)

    def train_step(self, batch):
        figures = real_step(self, batch)
        release(f"step {self.step + 1}")
        return figures

    dcp.FileSystemWriter.write_data, ShardedCheckpointer.save, ShardedCheckpointer.wait = write_data, save, wait
    Trainer.train_step = train_step
    try:
        code = main(["train", *args, "--output", run_dir])
    finally:
        dcp.FileSystemWriter.write_data, ShardedCheckpointer.save, ShardedCheckpointer.wait = (
            real_write,
            real_save,
            real_wait,
        )
        Trainer.train_step = real_step
    assert code == 0, f"switchformer train exited with {code}"
    return {"released": released}


def cli_exit_code(args: list[str]) -> int:
    """``switchformer ARGS`` on this rank; its exit code (the CLI reports errors as codes, not exceptions)."""
    return main(args)

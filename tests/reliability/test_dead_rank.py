"""A rank killed with SIGKILL in the middle of an expert-parallel ``switchformer train`` run: the surviving rank
stops with an error naming the collective within seconds (not the 10-minute process-group timeout), the last
complete checkpoint is intact, and ``--resume`` in one process finishes the run.

``tests/parallel/test_faults.py`` covers a dead or hung peer inside one Switch layer; this is the whole run.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from switchformer.cli.main import main
from switchformer.training.metrics import read_metrics
from tests.parallel.launcher import run_ranks
from tests.reliability.runs import assert_checkpoints_intact, train_args

STEPS = 8
BOUND_S = 20.0  # gloo sees the dead peer's socket close; the process-group timeout (10 min) never comes into it


def train_until_rank_1_dies(args: list[str], moment: str, step: int, clock: str) -> dict[str, Any]:
    """Run on every rank: the CLI, with rank 1 SIGKILLing itself at ``moment`` ("step" or "save") of ``step``."""
    from switchformer.training.trainer import Trainer

    def die() -> None:
        Path(clock).write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)

    if os.environ["RANK"] == "1":
        real_step, real_save = Trainer.train_step, Trainer.save

        def train_step(self: Trainer, batch: Any) -> Any:
            if moment == "step" and self.step + 1 == step:
                die()
            return real_step(self, batch)

        def save(self: Trainer) -> Any:
            if moment == "save" and self.step == step:
                die()
            return real_save(self)

        Trainer.train_step, Trainer.save = train_step, save  # type: ignore[method-assign]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(args)
    # The CLI turns the CollectiveError into exit code 1 and one line on stderr (no traceback).
    error = stderr.getvalue().strip().splitlines()[-1] if code != 0 and stderr.getvalue().strip() else None
    return {"error": error, "code": code, "at": time.time()}


@pytest.mark.parametrize(
    ("moment", "step", "latest"),
    [("step", 5, 4), pytest.param("save", 6, 4, marks=pytest.mark.slow)],
    ids=["in-a-step", "in-a-checkpoint-gather"],
)
def test_a_dead_rank_ends_the_run_quickly_and_it_resumes(tmp_path: Path, moment: str, step: int, latest: int) -> None:
    run, clock = tmp_path / "run", tmp_path / "died-at"
    args = [*train_args(run, steps=STEPS), "--expert-parallel", "2"]
    results = run_ranks(train_until_rank_1_dies, 2, timeout_s=300, args=args, moment=moment, step=step,
                        clock=str(clock))  # fmt: skip
    dead, survivor = results[1], results[0]
    assert dead.exitcode == -signal.SIGKILL and not dead.reported, dead
    assert survivor.reported and survivor.error is None, survivor.error or f"rank 0 hung (exit {survivor.exitcode})"
    error = survivor.value["error"]
    assert error is not None, "rank 0 finished although its peer was dead"
    assert survivor.value["code"] == 1
    assert "switchformer train: failed:" in error and "failed on rank 0" in error and "a peer process died" in error
    waited = survivor.value["at"] - float(clock.read_text())
    assert waited < BOUND_S, f"rank 0 took {waited:.1f}s to notice"
    print(f"rank 1 killed {moment} {step}; rank 0 stopped after {waited:.2f}s: {error[:160]}")

    assert assert_checkpoints_intact(run) == latest
    assert main(["train", "--resume", "--output", str(run), "--no-progress"]) == 0
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))

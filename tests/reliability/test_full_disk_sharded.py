"""A full disk while one rank writes its shards of a sharded checkpoint (``torchrun ... train --expert-parallel 2``):
every rank stops with the message one process gives (what failed, the space left, the previous checkpoint intact),
no temporary folder is left, the previous checkpoint verifies, and ``--resume`` finishes the run."""

from __future__ import annotations

from pathlib import Path

from switchformer.cli.main import main
from switchformer.training.metrics import read_metrics
from tests.parallel import runs as parallel_runs
from tests.reliability.runs import DRIVER, assert_checkpoints_intact

STEPS = 6
FULL_AT = 4  # the checkpoint whose write fails; the one before it is step 2
ARGS = parallel_runs.train_args("--expert-parallel", "2", "--checkpoint-every", "2", steps=STEPS)


def test_a_full_disk_during_a_sharded_save_keeps_the_previous_checkpoint_and_resumes(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "full.log"
    command = [*parallel_runs.torchrun_command(2), str(DRIVER), "train", *ARGS, "--output", str(run)]
    job = parallel_runs.launch(command, log, FAULT_ENOSPC=f"{FULL_AT}:shard-partial", FAULT_RANK="1")
    assert parallel_runs.finish(job, log) != 0, parallel_runs.tail(log)
    text = log.read_text(errors="replace")
    assert "No space left on device" in text and "step-00000002 is intact" in text, parallel_runs.tail(log)
    # A message, not a crash: no frame of ours in the log (torchrun prints its own traceback of the failed child).
    assert "switchformer/" not in text.split("torch/distributed/elastic")[0], parallel_runs.tail(log)
    assert assert_checkpoints_intact(run) == FULL_AT - 2
    assert not list((run / "checkpoints").glob(".*")), "the failed write left its temporary folder"
    assert main(["train", "--resume", "--output", str(run), "--no-progress"]) == 0
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))

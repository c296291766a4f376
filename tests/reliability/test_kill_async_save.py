"""kill -9 during an asynchronous sharded checkpoint (``torchrun ... train --expert-parallel 2 --async-checkpoint``):
of one rank while its background thread is half-way through writing its shards, or of the whole job once the step
folder is complete but not yet renamed into place. The previous step folder stays the latest, every one of its
files matches its manifest, the half-written folder is never taken for a checkpoint, and ``--resume`` finishes the
run with the uninterrupted one-process run's losses.

The fault driver (fault_driver.py, its sharded phases) pauses the chosen rank at the chosen point until the kill.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from switchformer.cli.main import main
from switchformer.run_folder import step_dir_name
from switchformer.training.checkpoint import verify_checkpoint
from switchformer.training.metrics import read_metrics
from tests.parallel import runs as parallel_runs
from tests.reliability.fault_driver import SHARDED_PHASES
from tests.reliability.runs import DRIVER, assert_checkpoints_intact

STEPS = 8
KILLED_AT = 4  # the checkpoint being written when the kill comes; the one before it is step 2
ARGS = parallel_runs.train_args("--expert-parallel", "2", "--async-checkpoint", "--checkpoint-every", "2", steps=STEPS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", *parallel_runs.train_args(steps=STEPS), "--output", str(run)]) == 0
    return run


def _launch(work: Path, name: str, args: list[str], **faults: str):
    command = [*parallel_runs.torchrun_command(2), str(DRIVER), "train", *args]
    events = work / f"{name}.events"
    return parallel_runs.launch(command, work / f"{name}.log", FAULT_EVENTS=str(events), **faults), events


def _pids(events: Path) -> dict[int, int]:
    """Each rank's process id, as the fault driver reported it."""
    lines = [line.split() for line in events.read_text().splitlines() if line.startswith("rank ") and " pid " in line]
    return {int(words[1]): int(words[3]) for words in lines}


@pytest.mark.parametrize(
    ("phase", "rank", "kill"),
    [("shard-partial", "1", "rank"), ("sharded-manifest", "0", "job")],
    ids=["rank-1-mid-write", "whole-job-before-rename"],
)
def test_kill9_during_an_asynchronous_save_keeps_the_previous_checkpoint_and_resumes(
    tmp_path: Path, reference: Path, phase: str, rank: str, kill: str
) -> None:
    assert phase in SHARDED_PHASES
    run = tmp_path / "run"
    job, events = _launch(
        tmp_path, "killed", [*ARGS, "--output", str(run)], FAULT_PAUSE=f"{KILLED_AT}:{phase}", FAULT_RANK=rank
    )
    assert parallel_runs.wait_for(events, "paused", job), parallel_runs.tail(tmp_path / "killed.log")
    assert f"paused rank {rank} save {KILLED_AT} {phase}" in events.read_text()
    if kill == "rank":  # the other rank and torchrun must end the job on their own
        os.kill(_pids(events)[int(rank)], signal.SIGKILL)
        code = parallel_runs.finish(job, tmp_path / "killed.log", timeout=120)
        assert code != 0, "the job finished although one of its ranks was killed"
    else:
        parallel_runs.kill_job(job)

    checkpoints = run / "checkpoints"
    assert assert_checkpoints_intact(run) == KILLED_AT - 2  # verifies every file of every complete checkpoint
    manifest = verify_checkpoint(checkpoints / step_dir_name(KILLED_AT - 2))
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "trainer_state.pt"} <= set(manifest["files"])
    assert not (checkpoints / step_dir_name(KILLED_AT)).exists()
    half_written = list(checkpoints.glob(f".{step_dir_name(KILLED_AT)}.tmp-*"))
    assert half_written, "the interrupted write should have left its temporary folder (else the kill came too late)"
    if phase == "sharded-manifest":  # complete, manifest included, but not renamed: still not a checkpoint
        assert (half_written[0] / "manifest.json").is_file()

    resumed, events = _launch(
        tmp_path, "resumed", ["--resume", "--expert-parallel", "2", "--no-progress", "--output", str(run)]
    )
    assert parallel_runs.finish(resumed, tmp_path / "resumed.log") == 0, parallel_runs.tail(tmp_path / "resumed.log")
    assert f"start {KILLED_AT - 2}" in events.read_text().splitlines()
    parallel_runs.assert_same_losses(read_metrics(run), read_metrics(reference))
    assert assert_checkpoints_intact(run) == STEPS
    assert not list(checkpoints.glob(".*")), "temporary folders were left behind"

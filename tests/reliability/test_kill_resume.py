"""kill -9 at chosen and at random moments of a real ``switchformer train`` run, then ``--resume`` until it is done.

Chosen moments are phases of a checkpoint write (and of the data cache), where the driver pauses so the SIGKILL
lands exactly there, with the file being written left half-written; random moments are seeded delays into the
training loop, slowed a little so they land inside steps and checkpoint writes. After every kill, each complete
checkpoint on disk still verifies; the next launch resumes from the last complete one; and the finished run logs
exactly the losses of an uninterrupted run and ends on the same weights.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from switchformer.training.checkpoint import list_checkpoints
from tests.reliability.fault_driver import SAVE_PHASES
from tests.reliability.runs import (
    CHECKPOINT_EVERY,
    KEEP,
    STEPS,
    assert_checkpoints_intact,
    assert_same_run,
    committed_steps,
    launch,
    run_to_completion,
    train_args,
)

STEP_DELAY_S, SAVE_DELAY_S = 0.03, 0.01  # for random kills: a save then takes about as long as two steps


@dataclasses.dataclass
class Kill:
    planned: str  # "pause at 6:manifest" or "random, 0.41 s into training"
    landed: str  # the driver's last event before the SIGKILL
    latest_after: int  # the newest complete checkpoint left on disk
    resumed_from: int | None = None  # where the next launch started


def _pause_step(rng: random.Random, phase: str, latest: int, on_disk: int, steps: int) -> int:
    """A checkpoint step after ``latest`` at which ``phase`` happens (pruning needs more than KEEP on disk)."""
    first = latest + CHECKPOINT_EVERY
    if phase == "pruning":
        first = max(first, latest + (KEEP + 1 - on_disk) * CHECKPOINT_EVERY)
    return min(first + CHECKPOINT_EVERY * rng.randint(0, 1), steps)


def kill_and_resume(
    work: Path, *, model_type: str, steps: int, seed: int, phases: list[str], random_kills: int
) -> list[Kill]:
    """Kill a run once per entry of ``phases`` (data first, then shuffled with ``random_kills`` random-time kills),
    resuming after each, then let it finish. Checks the invariants after every kill; returns what happened."""
    rng = random.Random(seed)
    run = work / "run"
    args = train_args(run, model_type=model_type, steps=steps)
    plan: list[str | None] = [p for p in phases if p not in SAVE_PHASES]  # the data cache is written first
    rest: list[str | None] = [p for p in phases if p in SAVE_PHASES] + [None] * random_kills
    rng.shuffle(rest)
    plan += rest
    kills: list[Kill] = []
    committed: set[int] = set()
    for number, phase in enumerate(plan):
        latest = assert_checkpoints_intact(run)
        resume = ["--resume"] if number else []
        if phase is None:
            slow = {"FAULT_STEP_DELAY": str(STEP_DELAY_S), "FAULT_SAVE_DELAY": str(SAVE_DELAY_S)}
            timed = launch([*args, *resume], work, name=f"launch{number}", faults=slow)
            assert timed.wait_for(lambda events: any(e.startswith("start ") for e in events)), timed.log()[-3000:]
            delay = rng.uniform(0.0, 0.6 * (steps - latest) * STEP_DELAY_S)  # well before the run could finish
            time.sleep(delay)
            assert timed.kill9(), "the run finished before the random kill"
            done, planned = timed, f"random, {delay:.2f} s into training"
        else:
            on_disk = len(list_checkpoints(run / "checkpoints"))
            where = "*" if phase not in SAVE_PHASES else str(_pause_step(rng, phase, latest, on_disk, steps))
            done = launch([*args, *resume], work, name=f"launch{number}", faults={"FAULT_PAUSE": f"{where}:{phase}"})
            assert done.wait_for(lambda events: any(e.startswith("paused ") for e in events)), (
                f"never reached {where}:{phase}; log:\n{done.log()[-3000:]}"
            )
            done.kill9()
            planned = f"pause at {where}:{phase}"
        if kills:
            kills[-1].resumed_from = done.start_step()
            assert kills[-1].resumed_from == kills[-1].latest_after, "did not resume from the last complete checkpoint"
        events = done.events()
        committed |= committed_steps(events)
        after = assert_checkpoints_intact(run)
        if phase is None:  # the rename and the event after it are two operations: a kill may fall between them
            # A kill can land before the launch's first step is done (a short delay on a loaded machine): then the
            # newest step reached is the one it resumed from.
            steps_done = [int(e.split()[1]) for e in events if e.startswith("step ")]
            reached = max(steps_done, default=done.start_step() or 0)
            assert max(committed, default=0) <= after, f"{planned}: latest checkpoint {after}, committed {committed}"
            assert after <= reached, f"{planned}: checkpoint {after} is ahead of the last step reached, {reached}"
        else:
            assert after == max(committed, default=0), f"{planned}: latest checkpoint {after}, expected {committed}"
        kills.append(Kill(planned, events[-1], after))
    final = run_to_completion([*args, "--resume"], work, name="final")
    kills[-1].resumed_from = final.start_step()
    assert kills[-1].resumed_from == kills[-1].latest_after
    assert not list((run / "checkpoints").glob(".*")), "temporary or half-deleted folders were left behind"
    return kills


def _report(kills: list[Kill]) -> None:
    for kill in kills:
        print(f"{kill.planned:32} landed after {kill.landed!r:32} -> resumed from step {kill.resumed_from}")


@pytest.mark.slow
def test_kill9_mid_write_and_at_random_moments_then_resume_gives_the_uninterrupted_run(
    reference_run: Callable[..., Path], tmp_path: Path
) -> None:
    rng = random.Random(0)
    phases = ["data-partial", *rng.sample(SAVE_PHASES, 2)]
    kills = kill_and_resume(tmp_path, model_type="encoder-decoder", steps=STEPS, seed=0, phases=phases, random_kills=1)
    _report(kills)
    assert len(kills) == 4
    assert_same_run(reference_run("encoder-decoder"), tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("model_type", ["encoder-decoder", "decoder-only"])
def test_kill9_in_every_phase_of_a_checkpoint_write(
    reference_run: Callable[..., Path], tmp_path: Path, model_type: str, seed: int
) -> None:
    phases = ["data-partial", *SAVE_PHASES]
    steps = 60  # room for 12 pause kills, each at least one checkpoint after the last
    kills = kill_and_resume(tmp_path, model_type=model_type, steps=steps, seed=seed, phases=phases, random_kills=3)
    _report(kills)
    assert len(kills) == len(phases) + 3
    assert_same_run(reference_run(model_type, steps), tmp_path / "run")


def test_kill9_while_the_cli_rewrites_the_run_config_then_resume(
    reference_run: Callable[..., Path], tmp_path: Path
) -> None:
    """``--resume`` rewrites ``run/config.json`` in place; a kill in that write must not make the run unresumable."""
    run = tmp_path / "run"
    args = train_args(run)
    first = launch(args, tmp_path, name="launch0", faults={"FAULT_PAUSE": "4:begin"})
    assert first.wait_for(lambda events: any(e.startswith("paused ") for e in events))
    first.kill9()
    second = launch([*args, "--resume"], tmp_path, name="launch1", faults={"FAULT_PAUSE": "*:run-config-partial"})
    assert second.wait_for(lambda events: any(e.startswith("paused ") for e in events))
    second.kill9()
    final = launch([*args, "--resume"], tmp_path, name="final")
    code = final.finish()
    assert code == 0, f"--resume after a kill mid-way through rewriting config.json failed:\n{final.log()[-1500:]}"
    assert final.start_step() == 2
    assert_same_run(reference_run("encoder-decoder"), run)


def test_full_disk_while_the_cli_saves_then_resume(reference_run: Callable[..., Path], tmp_path: Path) -> None:
    """ENOSPC in the middle of writing checkpoint 8: exit code 2 and a message that says the run is safe, no
    temporary folder left, checkpoint 6 intact; once there is space again, --resume finishes the same run."""
    run = tmp_path / "run"
    args = train_args(run)
    failed = launch(args, tmp_path, name="launch0", faults={"FAULT_ENOSPC": "8:optimizer-partial"})
    assert failed.finish() == 2
    message = failed.log()
    assert "No space left on device" in message and "step-00000006 is intact" in message, message[-1500:]
    assert "Traceback" not in message
    assert assert_checkpoints_intact(run) == 6
    assert not list((run / "checkpoints").glob(".*"))
    final = run_to_completion([*args, "--resume"], tmp_path, name="final")
    assert final.start_step() == 6
    assert_same_run(reference_run("encoder-decoder"), run)

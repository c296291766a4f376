"""Real ``switchformer train`` runs in subprocesses (through ``fault_driver.py``), killed and resumed by the tests.

The run is the CLI's main job shrunk to seconds: a slice of the built-in corpus, a 2-layer Switch model with 4
experts, a checkpoint every 2 steps. One intra-op thread everywhere, so runs are reproducible bit for bit and
gentle on a shared 2-core machine.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from switchformer.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, verify_checkpoint
from switchformer.training.metrics import read_metrics

DRIVER = Path(__file__).with_name("fault_driver.py")
LAUNCH_TIMEOUT_S = 240.0  # one launch on a loaded 2-core machine takes about 10 s

STEPS = 24
CHECKPOINT_EVERY = 2
KEEP = 3


def train_args(run_dir: Path, *, model_type: str = "encoder-decoder", steps: int = STEPS) -> list[str]:
    return [
        "train", "--output", str(run_dir), "--model-type", model_type, "--steps", str(steps),
        "--seq-len", "32", "--batch-size", "4", "--vocab-size", "400",
        "--data-set", "max_corpus_bytes=60000", "--data-set", "validation_batches=1",
        "--set", "d_model=32", "--set", "d_ff=64", "--set", "num_heads=4", "--set", "num_layers=2",
        "--set", "moe.num_experts=4",  # router jitter stays on: the RNG state must survive the kill too
        "--log-every", "1", "--eval-every", "8", "--checkpoint-every", str(CHECKPOINT_EVERY),
        "--train-set", "threads=1", "--train-set", f"keep_checkpoints={KEEP}", "--no-progress",
    ]  # fmt: skip


@dataclasses.dataclass
class Launch:
    """One subprocess running the CLI under the fault driver."""

    process: subprocess.Popen[bytes]
    events_path: Path
    log_path: Path

    def events(self) -> list[str]:
        return self.events_path.read_text().splitlines() if self.events_path.exists() else []

    def start_step(self) -> int | None:
        """The step the training loop started from (the resumed checkpoint's step, 0 for a fresh start)."""
        starts = [int(e.split()[1]) for e in self.events() if e.startswith("start ")]
        return starts[0] if starts else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = LAUNCH_TIMEOUT_S) -> bool:
        """Poll the events until ``predicate`` holds (True) or the process exits first (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.events()):
                return True
            if self.process.poll() is not None:
                return predicate(self.events())
            time.sleep(0.01)
        self.kill9()
        raise AssertionError(f"launch timed out after {timeout:.0f}s; log:\n{self.log()[-3000:]}")

    def kill9(self) -> bool:
        """SIGKILL the process (it may have exited already); True if it was still running."""
        alive = self.process.poll() is None
        if alive:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        return alive

    def finish(self, timeout: float = LAUNCH_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"launch timed out after {timeout:.0f}s; log:\n{self.log()[-3000:]}") from None


def launch(args: list[str], workdir: Path, *, name: str, faults: dict[str, str] | None = None) -> Launch:
    """Start ``switchformer ARGS`` under the fault driver; events and output go to ``workdir/NAME.*``."""
    events, log = workdir / f"{name}.events", workdir / f"{name}.log"
    env = {
        **os.environ,
        "FAULT_EVENTS": str(events),
        "OMP_NUM_THREADS": "1",
        "RAYON_NUM_THREADS": "1",  # the tokenizer's trainer and encoder
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
        **(faults or {}),
    }
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, str(DRIVER), *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    return Launch(process, events, log)


def run_to_completion(args: list[str], workdir: Path, *, name: str) -> Launch:
    done = launch(args, workdir, name=name)
    code = done.finish()
    assert code == 0, f"{name} exited with {code}; log:\n{done.log()[-3000:]}"
    return done


def checkpoint_step(path: Path | None) -> int:
    return 0 if path is None else int(path.name.split("-")[1])


def committed_steps(events: list[str]) -> set[int]:
    """Checkpoints whose folder was renamed into place, by the driver's events (the rename is the commit)."""
    return {int(e.split()[1]) for e in events if e.startswith("save ") and e.split()[2] in ("renamed", "pruning")}


def assert_checkpoints_intact(run_dir: Path) -> int:
    """Every complete checkpoint verifies against its manifest and loads; returns the latest one's step."""
    directory = run_dir / "checkpoints"
    for path in list_checkpoints(directory):
        verify_checkpoint(path)
    latest = latest_checkpoint(directory)
    if latest is not None:
        load_checkpoint(latest)
    return checkpoint_step(latest)


def assert_same_run(reference: Path, resumed: Path) -> None:
    """The resumed run logged every step once, with exactly the reference's losses, and ended on its weights."""
    a, b = read_metrics(reference), read_metrics(resumed)
    assert [r["step"] for r in b] == [r["step"] for r in a], "steps logged differ from the uninterrupted run"
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "load_balancing_loss", "val_loss"):
            assert x.get(key) == y.get(key), f"step {x['step']}: {key} {y.get(key)} vs uninterrupted {x.get(key)}"
    final_a = load_checkpoint(latest_checkpoint(reference / "checkpoints")).model_state
    final_b = load_checkpoint(latest_checkpoint(resumed / "checkpoints")).model_state
    assert final_a.keys() == final_b.keys()
    different = [name for name in final_a if not final_a[name].equal(final_b[name])]
    assert not different, f"final weights differ from the uninterrupted run: {different[:3]}"

"""Real ``switchformer train`` runs over several processes, and the comparisons with one process they must pass.

The run is the CLI's main job shrunk to seconds: a slice of the built-in corpus, a 2-layer encoder-decoder with 8
experts, a checkpoint after every step. ``grouping=sequence`` keeps each routing group inside a rank's slice; the
schedule is constant after a 2-step warm-up, so a run of N steps is the first N steps of a longer one (and a resumed
run with another ``--steps`` keeps the same learning rates). One intra-op thread everywhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from switchformer import ModelConfig, build_model
from switchformer.training.checkpoint import Checkpoint, list_checkpoints, load_checkpoint
from switchformer.training.config import TrainConfig
from switchformer.training.metrics import read_metrics
from switchformer.training.optim import build_optimizer
from switchformer.training.sharded_checkpoint import optimizer_state_by_name
from tests.parallel.launcher import free_port, run_and_check
from tests.parallel.tolerances import GRADIENT_RTOL, adafactor_drift_bound, adamw_drift_bound
from tests.parallel.train_workers import train_cli

STEPS = 8
LOSS_ATOL = 1e-5  # later steps start from weights that agree to the optimizer's drift bound, not bit for bit
LAUNCH_TIMEOUT_S = 300.0

BASE = (
    "--seq-len 32 --batch-size 8 --vocab-size 400 --data-set max_corpus_bytes=60000 --data-set validation_batches=1 "
    "--set d_model=32 --set d_ff=64 --set num_heads=4 --set num_layers=2 --set moe.num_experts=8 "
    "--set moe.grouping=sequence --schedule constant --warmup-steps 2 --log-every 1 --eval-every 2 "
    f"--checkpoint-every 1 --train-set keep_checkpoints={STEPS} --train-set threads=1 --no-progress"
).split()
NO_JITTER = ["--set", "moe.router_jitter=0"]


def train_args(*extra: str, steps: int = STEPS, jitter: bool = False) -> list[str]:
    return [*BASE, *([] if jitter else NO_JITTER), "--steps", str(steps), *extra]


def train_on_ranks(world: int, args: list[str], run: Path) -> list[dict[str, Any]]:
    """``switchformer train ARGS --output RUN`` on ``world`` gloo ranks; returns the main rank's metrics."""
    return run_and_check(train_cli, world, timeout_s=LAUNCH_TIMEOUT_S, args=args, run_dir=str(run))[0]


def environment(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RAYON_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
        **extra,
    }


def torchrun_command(nproc: int, *, nnodes: int = 1, endpoint: str | None = None) -> list[str]:
    """The ``torchrun`` launcher of this interpreter: standalone, or one node of ``nnodes`` meeting at ``endpoint``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes == 1:
        return [*command, "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "switchformer-test"]
    return [*command, "--nnodes", str(nnodes), *rendezvous]


def launch(command: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    """Start ``command`` in a session of its own (so the whole job can be killed at once), output to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=environment(**env), start_new_session=True
        )


def kill_job(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the launcher and every process it started: torchrun starts its workers in sessions of their own,
    so killing the launcher's process group alone would leave them running."""
    family = [process.pid, *_descendants(process.pid)]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):  # it may have ended already
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, from /proc (children's children included)."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent_of[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parent_of.items() if parent in frontier]
        found += children
        frontier = children
    return found


def finish(process: subprocess.Popen[bytes], log: Path, timeout: float = LAUNCH_TIMEOUT_S) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_job(process)
        raise AssertionError(f"launch timed out after {timeout:.0f}s; log:\n{tail(log)}") from None


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:]


def wait_for(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float = LAUNCH_TIMEOUT_S) -> bool:
    """Poll ``path`` until it holds ``text`` (True) or ``process`` exits first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return True
        if process.poll() is not None:
            return path.exists() and text in path.read_text()
        time.sleep(0.05)
    kill_job(process)
    raise AssertionError(f"{text!r} never appeared in {path} within {timeout:.0f}s")


# -- comparisons -----------------------------------------------------------------------------------------------
def assert_same_losses(logged: list[dict], expected: list[dict], *, atol: float = LOSS_ATOL) -> None:
    """The same steps, learning rates and (validation) losses; step 1 starts from the same weights, so its loss and
    gradient norm agree to float32 rounding of sums taken in another order."""
    assert [r["step"] for r in logged] == [r["step"] for r in expected]
    if logged and logged[0]["step"] == 1:
        assert abs(logged[0]["loss"] - expected[0]["loss"]) <= GRADIENT_RTOL * abs(expected[0]["loss"]), logged[0]
        assert abs(logged[0]["grad_norm"] - expected[0]["grad_norm"]) <= GRADIENT_RTOL * expected[0]["grad_norm"]
    for a, b in zip(logged, expected, strict=True):
        assert abs(a["loss"] - b["loss"]) <= atol, (a["step"], a["loss"], b["loss"])
        assert a["lr"] == b["lr"], a["step"]
        assert ("val_loss" in a) == ("val_loss" in b), a["step"]
        if "val_loss" in b:
            assert abs(a["val_loss"] - b["val_loss"]) <= atol, (a["step"], a["val_loss"], b["val_loss"])


def optimizer_state_of(checkpoint: Checkpoint) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint's optimizer state keyed by parameter name, whichever format wrote it."""
    state = checkpoint.optimizer_state
    assert state is not None
    if all(isinstance(key, str) for key in state["state"]):  # DCP (sharded): already by name
        return state["state"]
    model = build_model(ModelConfig.from_dict(checkpoint.config["model"]), device="meta")
    optimizer = build_optimizer(model, TrainConfig.from_dict(checkpoint.config["train"]))
    return optimizer_state_by_name(model, optimizer, state)["state"]


def assert_same_gradients_at_step_1(run: Path, reference: Path) -> None:
    """Step 1's optimizer state is a function of step 1's (clipped) gradients alone: AdamW's moments are (1 - b1) g
    and (1 - b2) g^2, Adafactor's the row and column means of g^2. They hold every weight's gradient, gathered from
    all ranks, so they are compared element by element, to float32 rounding of the largest."""
    ours = optimizer_state_of(load_checkpoint(run / "checkpoints" / "step-00000001"))
    theirs = optimizer_state_of(load_checkpoint(reference / "checkpoints" / "step-00000001"))
    assert ours.keys() == theirs.keys()
    for name, state in theirs.items():
        assert ours[name].keys() == state.keys(), name
        for key, value in state.items():
            if key != "step":
                scale = value.abs().max().item()
                diff = (torch.as_tensor(ours[name][key]) - value).abs().max().item()
                assert diff <= GRADIENT_RTOL * scale, (name, key, diff, scale)


def assert_same_weights(run: Path, reference: Path, step: int) -> None:
    """The run's checkpoint at ``step`` (any format, read whole in this process) holds the reference's weights, up
    to the drift its optimizer's arithmetic allows after ``step`` updates (tests/parallel/tolerances.py)."""
    name = f"step-{step:08d}"
    ours, theirs = load_checkpoint(run / "checkpoints" / name), load_checkpoint(reference / "checkpoints" / name)
    train = TrainConfig.from_dict(theirs.config["train"])
    lrs = [r["lr"] for r in read_metrics(reference)[:step]]
    assert ours.model_state.keys() == theirs.model_state.keys()
    for key, value in theirs.model_state.items():
        assert ours.model_state[key].shape == value.shape, key
        scale = value.abs().max().item()
        if train.optimizer.value == "adamw":
            bound = adamw_drift_bound(lrs, train.betas, weight_scale=scale)
        else:
            bound = adafactor_drift_bound(lrs, numel=value.numel(), weight_scale=scale)
        assert (ours.model_state[key] - value).abs().max() <= bound, (key, bound)


def checkpoint_steps(run: Path) -> list[int]:
    return [int(path.name.split("-")[1]) for path in list_checkpoints(run / "checkpoints")]

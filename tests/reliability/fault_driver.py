"""``python fault_driver.py ARGS``: run ``switchformer ARGS`` with hooks that report progress and inject faults.

The reliability tests start this script as a subprocess and kill it with SIGKILL. The hooks only observe and pause:
the checkpoint, data and CLI code under test runs unchanged. Configured by environment variables:

* ``FAULT_EVENTS``: a file to append progress to, one line per event, written with a single ``O_APPEND`` write so
  a kill never leaves half a line: ``start 4`` (training starts at step 4), ``step 5`` (step 5's update is done),
  ``save 6 PHASE`` (checkpoint 6 reached PHASE, see :data:`SAVE_PHASES`), ``saved 6``, ``paused WHERE``.
* ``FAULT_PAUSE=STEP:PHASE``: stop at that point until killed. ``*-partial`` phases first leave the file being
  written half-written on disk, as a kill in the middle of the write would. ``STEP`` is ``*`` for the phases that
  do not belong to a checkpoint (``data-partial``, ``run-config-partial``).
* ``FAULT_ENOSPC=STEP:PHASE``: raise ``OSError(ENOSPC)`` there instead (after the half write for ``*-partial``).
* ``FAULT_STEP_DELAY`` / ``FAULT_SAVE_DELAY``: seconds to sleep after each step / at each save phase, so that kills
  at random times land inside steps and checkpoint writes rather than in the interpreter's start-up.

Under torchrun (a sharded run: ``torchrun ... fault_driver.py train ...``) each rank reports ``rank R pid P`` first,
and the phases of a sharded checkpoint (:data:`SHARDED_PHASES`) can be paused at as well, on the rank named by
``FAULT_RANK`` only if it is set. An asynchronous save writes the shards in a background thread: a pause there
holds the write while training goes on.
"""

from __future__ import annotations

import errno
import fnmatch
import io
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

# The phases of one checkpoint write, in the order save_checkpoint passes them.
SAVE_PHASES = (
    "begin",  # save_checkpoint entered, nothing written yet
    "model-partial",  # model.safetensors half written
    "model",  # model.safetensors written
    "optimizer-partial",
    "optimizer",
    "trainer-state-partial",
    "trainer-state",
    "config",  # config.json written
    "manifest-partial",
    "manifest",  # manifest.json written: complete, but still in the temporary folder
    "renamed",  # renamed into place, before the directory fsync
    "pruning",  # the oldest checkpoint half deleted by keep-last-K pruning
)
OTHER_PHASES = ("data-partial", "run-config-partial")  # token cache half written; run_dir/config.json half rewritten
# The phases of one sharded (DCP) checkpoint write, on each rank; the last two on the main rank only.
SHARDED_PHASES = (
    "shard-partial",  # this rank's shard file half written (by the background thread of an asynchronous save)
    "shard",  # this rank's shard file written
    "sharded-manifest",  # every file and the manifest written, still in the temporary folder
    "sharded-renamed",  # renamed into place
)

EVENTS = os.environ.get("FAULT_EVENTS")
PAUSE = os.environ.get("FAULT_PAUSE")
PAUSE_RANK = os.environ.get("FAULT_RANK")
ENOSPC = os.environ.get("FAULT_ENOSPC")
STEP_DELAY = float(os.environ.get("FAULT_STEP_DELAY", "0"))
SAVE_DELAY = float(os.environ.get("FAULT_SAVE_DELAY", "0"))

_saving: list[int] = []  # the step of the checkpoint being written, while inside save_checkpoint
_pruning: list[bool] = []


def event(text: str) -> None:
    if EVENTS:
        fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (text + "\n").encode())
        finally:
            os.close(fd)


def _chosen(spec: str | None, phase: str, saving: int | None) -> bool:
    if not spec:
        return False
    step, _, name = spec.partition(":")
    return name == phase and (step == "*" or (saving is not None and int(step) == saving))


def at(phase: str, half_write: Callable[[], None] | None = None, *, step: int | None = None) -> None:
    """A phase boundary: report it, then pause, fail or (after a ``half_write`` for ``*-partial``) go on. ``step``:
    the checkpoint being written, when not inside save_checkpoint (a sharded save)."""
    saving = step if step is not None else (_saving[-1] if _saving else None)
    where = f"save {saving} {phase}" if saving is not None else phase
    rank = os.environ.get("RANK")
    event(where if step is None else f"rank {rank} {where}")
    pause = _chosen(PAUSE, phase, saving) and PAUSE_RANK in (None, rank)
    if half_write is not None and (pause or _chosen(ENOSPC, phase, saving)):
        half_write()
    if _chosen(ENOSPC, phase, saving):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if pause:
        event(f"paused {where}" if step is None else f"paused rank {rank} {where}")
        while True:  # until the test's SIGKILL
            time.sleep(60)
    if SAVE_DELAY and saving is not None:
        time.sleep(SAVE_DELAY)


def _install_sharded() -> None:
    """Hooks in the sharded checkpoint's writer (every rank, also in an asynchronous save's background thread) and
    in the main rank's completion of a step folder."""
    import torch.distributed.checkpoint as dcp

    import switchformer.training.sharded_checkpoint as sharded

    def step_of(folder: Any) -> int:  # .step-00000004.tmp-PID or step-00000004
        return int(pathlib.Path(folder).name.lstrip(".").split("-")[1].split(".")[0])

    real_write_data = dcp.FileSystemWriter.write_data

    def write_data(self: Any, plan: Any, planner: Any) -> Any:
        result = real_write_data(self, plan, planner)  # DCP's file writer writes before it returns
        step = step_of(self.path)

        def half() -> None:  # what a kill in the middle of this rank's write would leave of its shard files
            for shard in pathlib.Path(self.path).glob(f"__{os.environ['RANK']}_*.distcp"):
                os.truncate(shard, shard.stat().st_size // 2)

        at("shard-partial", half, step=step)
        at("shard", step=step)
        return result

    dcp.FileSystemWriter.write_data = write_data

    real_fsync_dir = sharded.fsync_directory
    completing: list[int] = []

    def fsync_dir(path: pathlib.Path) -> None:
        if path.name.startswith(".step-"):  # the temporary folder, manifest written, about to be renamed
            completing.append(step_of(path))
            at("sharded-manifest", step=completing[-1])
        real_fsync_dir(path)
        if path.name == "checkpoints" and completing:  # the checkpoints folder, after the rename
            at("sharded-renamed", step=completing.pop())

    sharded.fsync_directory = fsync_dir


def _write_half(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())


def install() -> None:
    if "RANK" in os.environ:
        event(f"rank {os.environ['RANK']} pid {os.getpid()}")
        _install_sharded()
    import safetensors.torch
    import torch

    import switchformer.data.pipeline as pipeline
    import switchformer.training.checkpoint as ckpt
    import switchformer.training.trainer as trainer_module

    real_save_checkpoint = trainer_module.save_checkpoint

    def save_checkpoint(directory: pathlib.Path, step: int, **kwargs: Any) -> pathlib.Path:
        _saving.append(step)
        try:
            at("begin")
            path = real_save_checkpoint(directory, step, **kwargs)
        finally:
            _saving.pop()
        event(f"saved {step}")
        return path

    trainer_module.save_checkpoint = save_checkpoint

    real_save_file = ckpt.save_file

    def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
        at("model-partial", lambda: _write_half(pathlib.Path(filename), safetensors.torch.save(tensors, metadata)))
        real_save_file(tensors, filename, metadata=metadata)
        at("model")

    ckpt.save_file = save_file

    real_torch_save = ckpt._torch_save

    def torch_save(obj: Any, path: pathlib.Path) -> None:
        phase = "optimizer" if path.name == ckpt.OPTIMIZER_FILE else "trainer-state"

        def half() -> None:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            _write_half(path, buffer.getvalue())

        at(f"{phase}-partial", half)
        real_torch_save(obj, path)
        at(phase)

    ckpt._torch_save = torch_save

    real_write_json = ckpt._write_json

    def write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
        if path.name == ckpt.MANIFEST:
            at("manifest-partial", lambda: _write_half(path, json.dumps(data, indent=2, sort_keys=True).encode()))
        real_write_json(path, data)
        at("manifest" if path.name == ckpt.MANIFEST else "config")

    ckpt._write_json = write_json

    real_fsync_dir = ckpt.fsync_directory

    def fsync_dir(path: pathlib.Path) -> None:
        if _saving and not path.name.startswith("."):  # the checkpoints folder, after the rename
            at("renamed")
        real_fsync_dir(path)

    ckpt.fsync_directory = fsync_dir

    real_prune = ckpt.prune_checkpoints

    def prune_checkpoints(directory: pathlib.Path, keep: int) -> None:
        _pruning.append(True)
        try:
            real_prune(directory, keep)
        finally:
            _pruning.pop()

    ckpt.prune_checkpoints = prune_checkpoints

    real_rmtree = shutil.rmtree

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        folder = pathlib.Path(path)
        if _pruning and folder.is_dir():

            def half() -> None:  # delete every other file, as an interrupted rmtree would leave it
                for file in sorted(p for p in folder.iterdir() if p.is_file())[::2]:
                    file.unlink()

            at("pruning", half)
        real_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree

    real_save_array = pipeline._save_array

    def save_array(path: pathlib.Path, array: Any) -> None:
        def half() -> None:
            buffer = io.BytesIO()
            import numpy as np

            np.save(buffer, array)
            _write_half(path.with_name(f".{path.name}.{os.getpid()}.tmp"), buffer.getvalue())  # atomic_write's temp

        at("data-partial", half)
        real_save_array(path, array)

    pipeline._save_array = save_array

    run_dir = pathlib.Path(sys.argv[sys.argv.index("--output") + 1])
    real_write_text = pathlib.Path.write_text

    def is_run_config(path: pathlib.Path) -> bool:  # in place, or via atomic_write's temporary .config.json.*.tmp
        in_run = path.parent == run_dir
        return in_run and (path.name == "config.json" or fnmatch.fnmatch(path.name, ".config.json.*.tmp"))

    def write_text(self: pathlib.Path, data: str, *args: Any, **kwargs: Any) -> int:
        if is_run_config(self):  # write_text truncates first: a kill mid-write leaves a cut file
            at("run-config-partial", lambda: _write_half(self, data.encode()))
        return real_write_text(self, data, *args, **kwargs)

    pathlib.Path.write_text = write_text  # type: ignore[method-assign]

    from switchformer.training.trainer import Trainer

    real_train, real_train_step = Trainer.train, Trainer.train_step

    def train(self: Trainer) -> dict[str, Any]:
        event(f"start {self.step}")
        return real_train(self)

    def train_step(self: Trainer, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        figures = real_train_step(self, batch)
        event(f"step {self.step + 1}")
        if STEP_DELAY:
            time.sleep(STEP_DELAY)
        return figures

    Trainer.train, Trainer.train_step = train, train_step  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    from switchformer.cli.main import main

    sys.exit(main(sys.argv[1:]))

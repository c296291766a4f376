"""A full disk while saving: whichever write fails, the previous checkpoint stays the latest, verifies and loads
unchanged, no half-written folder is left behind, and the error says what happened and that nothing was lost.

Two kinds of failure. Real ones: the kernel refuses writes past a file-size limit (``RLIMIT_FSIZE``, the same
failed ``write()`` a full disk gives), so the libraries' own error types come through (safetensors raises
``SafetensorError``, ``torch.save`` a ``RuntimeError``, neither an ``OSError``). Injected ones: ``ENOSPC`` at each
step of the save, after half of the file was written, including the fsyncs and the rename.
The CLI's exit code and message for the same fault are in ``test_kill_resume.py``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from switchformer.errors import CheckpointError
from switchformer.training import checkpoint as ckpt
from switchformer.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from switchformer.training.metrics import read_metrics
from switchformer.training.trainer import CyclingBatches, Trainer
from tests.training.conftest import synthetic_batches, tiny_model, tiny_train_config

ENOSPC_TEXT = os.strerror(errno.ENOSPC)  # "No space left on device"


def _trainer(run_dir: Path, *, resume: bool = False, **changes: Any) -> Trainer:
    data = synthetic_batches("decoder-only", count=4)
    config = tiny_train_config(**{"steps": 8, "checkpoint_every": 2, "eval_every": 4, "keep_checkpoints": 3, **changes})
    return Trainer(tiny_model("decoder-only"), config, train_batches=CyclingBatches(data[:-1]), validation=data[-1:],
                   run_dir=run_dir, resume=resume, tensorboard=False)  # fmt: skip


@pytest.fixture
def trainer(tmp_path: Path) -> Trainer:
    """A trainer two steps in, with checkpoint 2 on disk; the tests then try to save step 4."""
    trainer = _trainer(tmp_path, steps=2)
    trainer.train()
    trainer.step = 4
    return trainer


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _assert_nothing_lost(trainer: Trainer, before: dict[str, bytes], error: CheckpointError, reason: str) -> None:
    directory = trainer.checkpoint_dir
    previous = directory / "step-00000002"
    message = str(error)
    assert reason in message and f"{previous} is intact" in message and "MiB free" in message, message
    assert latest_checkpoint(directory) == previous
    assert _files(previous) == before, "the previous checkpoint was modified"
    load_checkpoint(previous)  # verifies every checksum
    assert [p.name for p in directory.iterdir()] == [previous.name], "a temporary folder was left behind"


# -- real write failures -------------------------------------------------------------------------------------
@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes of any file fail with EFBIG, as writes to a full disk fail with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt"])
def test_a_real_write_failure_keeps_the_previous_checkpoint(trainer: Trainer, victim: str) -> None:
    previous = trainer.checkpoint_dir / "step-00000002"
    sizes = {name: len(data) for name, data in _files(previous).items()}
    assert sizes["optimizer.pt"] > sizes["model.safetensors"] > max(sizes["trainer_state.pt"], sizes["config.json"])
    # The model file is written first and the optimizer file is the largest: a limit between them fails the latter.
    limit = sizes[victim] // 2 if victim == "model.safetensors" else (sizes["model.safetensors"] + sizes[victim]) // 2
    before = _files(previous)
    with file_size_limit(limit), pytest.raises(CheckpointError) as error:
        trainer.save()
    _assert_nothing_lost(trainer, before, error.value, "step-00000004")


# -- ENOSPC at each point of the save ------------------------------------------------------------------------
def _enospc() -> OSError:
    return OSError(errno.ENOSPC, ENOSPC_TEXT)


def _half_then_fail(write: Callable[..., None], name: str) -> Callable[..., None]:
    """Wrap a checkpoint writer: for the file ``name``, write half of it, then fail as a full disk does."""

    def wrapped(*args: Any, **kwargs: Any) -> None:
        path = Path(next(a for a in args if isinstance(a, str | os.PathLike)))  # the writers differ in arg order
        write(*args, **kwargs)
        if path.name == name:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            raise _enospc()

    return wrapped


def _fail_call(real: Callable[..., Any], when: Callable[..., bool]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if when(*args):
            raise _enospc()
        return real(*args, **kwargs)

    return wrapped


POINTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "model file": lambda mp: mp.setattr(ckpt, "save_file", _half_then_fail(ckpt.save_file, "model.safetensors")),
    "optimizer file": lambda mp: mp.setattr(ckpt, "_torch_save", _half_then_fail(ckpt._torch_save, "optimizer.pt")),
    "trainer state": lambda mp: mp.setattr(ckpt, "_torch_save", _half_then_fail(ckpt._torch_save, "trainer_state.pt")),
    "config": lambda mp: mp.setattr(ckpt, "_write_json", _half_then_fail(ckpt._write_json, "config.json")),
    "manifest": lambda mp: mp.setattr(ckpt, "_write_json", _half_then_fail(ckpt._write_json, "manifest.json")),
    # Delayed allocation (NFS, quotas, thin volumes) reports the full disk at fsync rather than at write.
    "fsync": lambda mp: mp.setattr(ckpt.os, "fsync", _fail_call(os.fsync, lambda fd: True)),
    "rename": lambda mp: mp.setattr(ckpt.os, "replace", _fail_call(os.replace, lambda src, dst: ".tmp-" in str(src))),
}


@pytest.mark.parametrize("point", sorted(POINTS))
def test_enospc_anywhere_in_the_save_keeps_the_previous_checkpoint(
    trainer: Trainer, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    previous = trainer.checkpoint_dir / "step-00000002"
    before = _files(previous)
    POINTS[point](monkeypatch)
    with pytest.raises(CheckpointError) as error:
        trainer.save()
    monkeypatch.undo()
    _assert_nothing_lost(trainer, before, error.value, ENOSPC_TEXT)


def test_enospc_on_the_very_first_save_says_nothing_was_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _trainer(tmp_path, steps=2)
    POINTS["model file"](monkeypatch)
    with pytest.raises(CheckpointError, match="no earlier checkpoint exists, so nothing saved was lost"):
        trainer.train()
    monkeypatch.undo()
    assert list_checkpoints(trainer.checkpoint_dir) == []
    assert not list(trainer.checkpoint_dir.iterdir())


def test_a_failed_directory_fsync_after_the_rename_keeps_the_new_checkpoint(
    trainer: Trainer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Once renamed the checkpoint is complete; reporting it as lost (and naming it "previous") would mislead."""
    real = ckpt.fsync_directory
    monkeypatch.setattr(ckpt, "fsync_directory", _fail_call(real, lambda path: path == trainer.checkpoint_dir))
    saved = trainer.save()
    assert saved == latest_checkpoint(trainer.checkpoint_dir) == trainer.checkpoint_dir / "step-00000004"
    load_checkpoint(saved)
    assert "could not fsync" in caplog.text


def test_resaving_a_step_that_fails_keeps_the_old_copy(trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving a step that already exists (a resume from an earlier one) replaces it only once the new one is in."""
    trainer.step = 2
    existing = trainer.checkpoint_dir / "step-00000002"
    before = _files(existing)
    POINTS["rename"](monkeypatch)
    with pytest.raises(CheckpointError, match=ENOSPC_TEXT):
        trainer.save()
    monkeypatch.undo()
    assert latest_checkpoint(trainer.checkpoint_dir) == existing and _files(existing) == before
    assert [p.name for p in trainer.checkpoint_dir.iterdir()] == [existing.name]


def test_training_stopped_by_a_full_disk_resumes_to_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _trainer(tmp_path / "reference")
    reference.train()
    failing = _trainer(tmp_path / "run")
    real, full = ckpt._torch_save, _half_then_fail(ckpt._torch_save, "optimizer.pt")

    def disk_full_at_step_6(obj: Any, path: Path) -> None:
        (full if path.parent.name.startswith(".step-00000006") else real)(obj, path)

    monkeypatch.setattr(ckpt, "_torch_save", disk_full_at_step_6)
    with pytest.raises(CheckpointError, match=r"step-00000004 is intact"):
        failing.train()
    monkeypatch.undo()  # space freed
    resumed = _trainer(tmp_path / "run", resume=True)
    assert resumed.step == 4
    resumed.train()
    a, b = read_metrics(tmp_path / "reference"), read_metrics(tmp_path / "run")
    assert [(r["step"], r["loss"], r.get("val_loss")) for r in b] == [
        (r["step"], r["loss"], r.get("val_loss")) for r in a
    ]
    final = resumed.model.state_dict()
    assert all(torch.equal(final[name], value) for name, value in reference.model.state_dict().items())


def test_a_metrics_line_cut_by_a_full_disk_does_not_block_the_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while appending to metrics.jsonl leaves half a line; once there is space, --resume must cope."""
    from switchformer.training.metrics import MetricsWriter

    real = MetricsWriter.write

    def write(self: MetricsWriter, record: dict[str, Any]) -> None:
        if record["step"] != 5:
            return real(self, record)
        with self.path.open("a") as handle:
            line = json.dumps(record) + "\n"
            handle.write(line[: len(line) // 2])
        raise _enospc()

    monkeypatch.setattr(MetricsWriter, "write", write)
    with pytest.raises(OSError, match=ENOSPC_TEXT):
        _trainer(tmp_path).train()
    monkeypatch.undo()
    resumed = _trainer(tmp_path, resume=True)
    assert resumed.step == 4
    resumed.train()
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))

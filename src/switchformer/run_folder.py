"""The run folder's layout, and the one way files and folders are written into it: atomically.

A training run folder::

    RUN_DIR/
      config.json                   model, train and data configs, written before the first step
      metrics.jsonl                 one JSON object per logged step
      summary.json                  written when training ends (its ``steps`` say how far the run got)
      tensorboard/
      checkpoints/
        step-00000100/              one complete checkpoint (see ``switchformer.training.checkpoint``)
          manifest.json             written last; a step folder without it is not a checkpoint
          config.json, model.safetensors, ...

Fine-tuning, distillation and comparisons write run folders of this shape (plus files of their own). Everything
is written to a hidden temporary name in the same folder and renamed into place (:func:`atomic_write`,
:func:`atomic_directory`), so a crash, ``kill -9`` or a full disk leaves the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from switchformer.errors import CheckpointError

CHECKPOINTS_DIR = "checkpoints"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
MANIFEST = "manifest.json"  # the last file of a checkpoint: its presence marks the folder complete
STEP_DIR = re.compile(r"^step-(\d{8})$")
_UMASK = os.umask(0o22)
os.umask(_UMASK)


# -- atomic writes --------------------------------------------------------------------------------------------


def atomic_write(path: Path | str, write: Callable[[Path], None], *, durable: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    ``durable`` also fsyncs the file before the rename (for files a resume depends on). On any error the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private; a plain open would not have
        write(tmp)
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path | str, text: str, *, durable: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), durable=durable)


def atomic_write_json(path: Path | str, data: Any, *, durable: bool = False, sort_keys: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", durable=durable)


@contextlib.contextmanager
def atomic_directory(final: Path | str) -> Iterator[Path]:
    """Fill the yielded temporary folder; on success it replaces ``final`` in one rename.

    An existing ``final`` is set aside first and deleted only once the new folder is in place (restored if the
    rename fails). Leftovers of a killed write are named ``.NAME.tmp-PID`` and ``.NAME.old-PID``
    (:func:`remove_leftovers` clears them).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    replaced = final.parent / f".{final.name}.old-{os.getpid()}"
    for leftover in (tmp, replaced):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            os.replace(final, replaced)
        try:
            os.replace(tmp, final)
        except BaseException:
            if replaced.exists():
                os.replace(replaced, final)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(replaced, ignore_errors=True)


def remove_leftovers(folder: Path, pattern: str = "*") -> None:
    """Delete what killed :func:`atomic_directory` writes of ``folder/PATTERN`` left behind."""
    for stale in [*folder.glob(f".{pattern}.tmp-*"), *folder.glob(f".{pattern}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def fsync_directory(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


# -- the layout ------------------------------------------------------------------------------------------------


def checkpoints_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(directory: Path | str) -> list[Path]:
    """Complete checkpoints in a checkpoints folder (renamed into place and holding a manifest), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(directory: Path | str) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def latest_run_checkpoint(run_dir: Path | str) -> Path | None:
    """The newest complete checkpoint of a run folder, or None before its first one."""
    return latest_checkpoint(checkpoints_dir(run_dir))


def is_run_folder(path: Path | str) -> bool:
    return checkpoints_dir(path).is_dir()


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint folder itself, the latest complete checkpoint of a run folder, or of a checkpoints folder."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = latest_run_checkpoint(path) or latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint nor a run folder with checkpoints "
            f"(looked for {path}/{CHECKPOINTS_DIR}/step-*/)"
        )
    return latest


def read_summary(run_dir: Path | str) -> dict[str, Any] | None:
    """The run's ``summary.json``, or None when training never finished (or the file is damaged)."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished_steps(run_dir: Path | str) -> int:
    """Steps of a run's last completed training (``summary.json``), 0 if it never finished."""
    summary = read_summary(run_dir)
    return int(summary.get("steps", 0)) if isinstance(summary, dict) else 0


def write_summary(run_dir: Path | str, summary: dict[str, Any]) -> Path:
    return atomic_write_json(Path(run_dir) / SUMMARY_FILE, summary, sort_keys=False)


def write_run_config(run_dir: Path | str, configs: dict[str, Any]) -> Path:
    """The run's ``config.json`` (``{"model": ..., "train": ..., "data": ...}``), what ``--resume`` reads before
    the first checkpoint exists."""
    return atomic_write_json(Path(run_dir) / CONFIG_FILE, configs, sort_keys=False)


def read_run_config(run_dir: Path | str) -> dict[str, Any] | None:
    """The configs to resume a run with: its latest checkpoint's, else its ``config.json``, else None.

    Raises :class:`CheckpointError` for a damaged checkpoint config; a damaged run-folder ``config.json`` (a run
    killed before its first checkpoint) reads as None.
    """
    latest = latest_run_checkpoint(run_dir)
    if latest is not None:
        try:
            return json.loads((latest / CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{latest / CONFIG_FILE} is unreadable ({error})") from error
    try:
        return json.loads((Path(run_dir) / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None

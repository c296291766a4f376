"""Checkpoints that are never half-written: a temporary folder, checksums, then an atomic rename.

Layout of ``checkpoints/step-00000100/`` written by one process: ``model.safetensors`` (weights), ``optimizer.pt``
and ``trainer_state.pt`` (read back with ``torch.load(weights_only=True)``, so a crafted file cannot run code),
``config.json`` (model, training and data configs; also what :func:`switchformer.from_pretrained` reads) and
``manifest.json`` (size and SHA-256 of every file, written last). A run over several ranks writes DCP's sharded
files (``.metadata``, ``__RANK_N.distcp``) in place of the weights and optimizer files
(:mod:`.sharded_checkpoint`); :func:`load_checkpoint` reads either into one process. A folder is complete only
once renamed into place, so a crash or Ctrl-C at any moment leaves the previous checkpoint as the latest valid one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from switchformer.dcp_files import METADATA_FILE, is_dcp_folder, read_whole
from switchformer.errors import CheckpointError
from switchformer.run_folder import (
    CONFIG_FILE,
    MANIFEST,
    atomic_directory,
    fsync_directory,
    latest_checkpoint,
    list_checkpoints,
    remove_leftovers,
    resolve_checkpoint,
    step_dir_name,
)

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"

__all__ = [
    "CONFIG_FILE",
    "MANIFEST",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "Checkpoint",
    "check_model_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_state",
    "prune_checkpoints",
    "resolve_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]


@dataclasses.dataclass
class Checkpoint:
    path: Path
    step: int
    model_state: dict[str, torch.Tensor]  # the whole model's weights
    # torch's optimizer.state_dict() (keyed by parameter index) from one process; keyed by parameter name
    # (torch.distributed.checkpoint.state_dict's form) from a sharded checkpoint
    optimizer_state: dict[str, Any] | None
    trainer_state: dict[str, Any]
    config: dict[str, Any]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with path.open("w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _torch_save(obj: Any, path: Path) -> None:
    with path.open("wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(
    directory: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    keep: int | None = None,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write ``directory/step-XXXXXXXX`` atomically and keep only the newest ``keep`` checkpoints.

    ``extra_files`` (name -> existing file) are copied in and covered by the manifest, e.g. the tokenizer.

    On failure (a full disk, say) the temporary folder is removed and a :class:`CheckpointError` says so; the
    checkpoints already there are untouched.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / step_dir_name(step)
    try:
        with atomic_directory(final) as tmp:
            tensors = {name: t.detach().contiguous().cpu() for name, t in model_state.items()}
            save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "step": str(step)})
            if optimizer_state is not None:
                _torch_save(optimizer_state, tmp / OPTIMIZER_FILE)
            write_checkpoint_files(tmp, trainer_state, config, extra_files)
            files = sorted(p.name for p in tmp.iterdir())
            manifest = {
                "step": step,
                "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256_of(tmp / n)} for n in files},
            }
            _write_json(tmp / MANIFEST, manifest)
            fsync_directory(tmp)
    # Not only OSError: on a full disk safetensors raises SafetensorError and torch.save a RuntimeError.
    except Exception as error:
        raise CheckpointError(save_failure(final, error)) from error
    try:  # the checkpoint is complete once renamed; a failed directory fsync only weakens power-loss durability
        fsync_directory(directory)
    except OSError as error:
        logger.warning("saved %s, but could not fsync %s (%s)", final, directory, error)
    if keep is not None:
        prune_checkpoints(directory, keep)
    logger.info("saved checkpoint %s", final)
    return final


def write_checkpoint_files(
    folder: Path, trainer_state: dict[str, Any], config: dict[str, Any], extra_files: dict[str, Path] | None
) -> None:
    """What every checkpoint holds beside the weights: the trainer state, the configs and ``extra_files`` (name ->
    existing file, e.g. the tokenizer, so a checkpoint stands alone)."""
    _torch_save(trainer_state, folder / STATE_FILE)
    _write_json(folder / CONFIG_FILE, config)
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, folder / name)


def save_failure(final: Path, error: BaseException) -> str:
    """What went wrong, how much space is left, and that the checkpoints already there are safe."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    message = f"could not write checkpoint {final} ({reason})"
    try:
        free = shutil.disk_usage(final.parent).free
        message += f"; {free / 2**20:,.1f} MiB free on its disk"
    except OSError:  # pragma: no cover - the folder itself became unreadable
        pass
    previous = latest_checkpoint(final.parent)
    if previous is not None:
        return message + f"; the previous checkpoint {previous} is intact and --resume continues from it"
    return message + "; no earlier checkpoint exists, so nothing saved was lost"


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and leftovers of writes and deletions that were killed.

    Each folder is first renamed out of sight, so a kill during the deletion never leaves a half-deleted folder
    that still looks complete.
    """
    for old in list_checkpoints(directory)[:-keep]:
        hidden = directory / f".{old.name}.old-{os.getpid()}"
        os.replace(old, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    remove_leftovers(directory, "step-*")


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file against the manifest; raise :class:`CheckpointError` naming the first bad one.

    The manifest must cover the files that are read back (model, trainer state, config), so none is used unchecked.
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint: {MANIFEST} is missing (was the write interrupted?)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        step = manifest["step"]
        problem = _manifest_problem(step, files)
        if problem is None and (path / OPTIMIZER_FILE).is_file() and OPTIMIZER_FILE not in files:
            problem = f"incomplete (no checksum for {OPTIMIZER_FILE})"
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        problem = f"unreadable ({error})"
    if problem:
        raise CheckpointError(f"{manifest_path} is {problem}; the checkpoint cannot be trusted")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if file.stat().st_size != expected["bytes"] or sha256_of(file) != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint file {file} is corrupted or truncated (checksum mismatch); use an older checkpoint"
            )
    return manifest


def _manifest_problem(step: Any, files: Any) -> str | None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"malformed (step {step!r} is not a step number)"
    if not isinstance(files, dict):
        return "malformed (no file table)"
    for name, expected in files.items():
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            return f"malformed (file name {name!r} is not a plain file name)"
        if not (
            isinstance(expected, dict)
            and isinstance(expected.get("bytes"), int)
            and isinstance(expected.get("sha256"), str)
        ):
            return f"malformed (no size and checksum for {name})"
    weights = METADATA_FILE if METADATA_FILE in files else MODEL_FILE  # sharded (DCP) or one file
    unchecked = [name for name in (weights, STATE_FILE, CONFIG_FILE) if name not in files]
    if unchecked:
        return f"incomplete (no checksum for {', '.join(unchecked)})"
    return None


def load_checkpoint(
    path: Path, *, with_optimizer: bool = True, verify: bool = True, with_weights: bool = True
) -> Checkpoint:
    """Read a checkpoint folder; nothing is applied to a model here, so a bad file leaves the model untouched.

    ``with_weights=False`` reads only the trainer state and configs (the model and optimizer states come back
    empty): what a sharded run needs before each rank reads its own shards.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        manifest = verify_checkpoint(path) if verify else json.loads((path / MANIFEST).read_text())
        step = int(manifest["step"])
        optimizer_state = None
        model_state: dict[str, torch.Tensor] = {}
        if not with_weights:
            pass
        elif is_dcp_folder(path):
            whole = read_whole(path, keys={"model", "optimizer"} if with_optimizer else {"model"})
            model_state, optimizer_state = whole["model"], whole.get("optimizer")
        else:
            model_state = load_file(str(path / MODEL_FILE))
            if with_optimizer and (path / OPTIMIZER_FILE).is_file():
                optimizer_state = torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
        trainer_state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
        config = json.loads((path / CONFIG_FILE).read_text())
    except CheckpointError:
        raise
    except Exception as error:  # safetensors / unpickler errors: a crafted or damaged file
        raise CheckpointError(f"could not read checkpoint {path}: {error}") from error
    return Checkpoint(path, step, model_state, optimizer_state, trainer_state, config)


def check_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: Path | str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the model's tensor names and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(n for n in set(own) & set(state) if own[n].shape != state[n].shape)
    if missing or unexpected or wrong:
        details = []
        if wrong:
            details.append(
                "shape mismatch: "
                + ", ".join(f"{n} {tuple(state[n].shape)} vs model {tuple(own[n].shape)}" for n in wrong[:3])
            )
        if missing:
            details.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if unexpected:
            details.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"checkpoint {source} was saved from another model config ({'; '.join(details)}); "
            "train with the same preset/--set overrides, or start a new run folder"
        )


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: Path | str) -> None:
    """Load weights only if every name and shape fits, so a mismatched checkpoint is never half-loaded."""
    check_model_state(model, state, source=source)
    model.load_state_dict(state)

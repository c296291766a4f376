"""Weight files of a checkpoint folder: read safetensors or ``.bin`` (sharded or not), write atomically.

Reading uses only ``safetensors`` and ``torch.load(..., weights_only=True)``, so a checkpoint cannot run code.
Every file is written to a temporary name in the same folder and moved into place
(:func:`switchformer.run_folder.atomic_write`), so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from switchformer.dcp_files import is_dcp_folder, read_whole
from switchformer.interop.key_map import CheckpointError
from switchformer.run_folder import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)
# What a T5 / Switch checkpoint ships for its SentencePiece vocabulary (the fast and the slow tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")
_SHARD = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weight file not found") from None
    except Exception as error:  # safetensors and unpickler errors: a damaged or crafted file
        raise CheckpointError(f"{path}: cannot read weights ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors")
    return state


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``folder``: ``model.safetensors`` or ``pytorch_model.bin``, or their sharded index, or the
    model part of a sharded training checkpoint (``torch.distributed.checkpoint``'s ``.metadata`` and shards).

    Safetensors is preferred when both formats are present.
    """
    if is_dcp_folder(folder):
        return read_whole(folder, keys={"model"})["model"]
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        if (folder / single).is_file():
            return _load_one(folder / single)
        if (folder / index).is_file():
            return _read_sharded(folder / index)
    raise CheckpointError(f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' object naming the shard of each tensor")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise CheckpointError(f"{index_path}: shard name {shard!r} must be a file in the same folder")
        tensors = _load_one(index_path.parent / shard)
        expected = {key for key, name in weight_map.items() if name == shard}
        absent = expected - set(tensors)
        if absent:
            raise CheckpointError(f"{index_path.parent / shard}: missing tensors the index lists: {sorted(absent)[:5]}")
        state.update({key: tensors[key] for key in expected})
    return state


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy the tokenizer files ``source`` has into ``destination`` (a converted checkpoint keeps its vocabulary)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            data = (source / name).read_bytes()
            atomic_write(destination / name, lambda tmp, data=data: tmp.write_bytes(data))
            copied.append(name)
    return copied


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_json(path, data)


def write_weights(folder: Path, state: Mapping[str, torch.Tensor], *, max_shard_bytes: int | None = None) -> list[str]:
    """Write ``state`` as ``model.safetensors``, or as shards plus an index when it exceeds ``max_shard_bytes``.

    Returns the names of the files written; weight files of an earlier save that this one does not replace are
    removed, so a folder never holds two conflicting sets of weights.
    """
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}
    shards = _plan_shards(state, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers requires it
    if len(shards) == 1:
        atomic_write(folder / SAFETENSORS, lambda tmp: save_file(state, str(tmp), metadata=metadata))
        written = [SAFETENSORS]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, keys in zip(names, shards, strict=True):
            part = {key: state[key] for key in keys}
            atomic_write(folder / name, lambda tmp, part=part: save_file(part, str(tmp), metadata=metadata))
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {key: name for name, keys in zip(names, shards, strict=True) for key in keys}
        write_json(folder / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written = [*names, SAFETENSORS_INDEX]
    _remove_stale(folder, keep=set(written))
    return written


def _plan_shards(state: Mapping[str, torch.Tensor], max_shard_bytes: int | None) -> list[list[str]]:
    if max_shard_bytes is None:
        return [list(state)]
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _remove_stale(folder: Path, *, keep: set[str]) -> None:
    for path in folder.iterdir():
        is_weights = path.name in WEIGHT_FILES or _SHARD.fullmatch(path.name) is not None
        if is_weights and path.name not in keep:
            logger.info("removing %s left by an earlier save", path)
            path.unlink()

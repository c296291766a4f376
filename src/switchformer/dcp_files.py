"""``torch.distributed.checkpoint`` (DCP) folders, read without running code from the files.

DCP writes one ``__RANK_N.distcp`` file per rank (its shards) and a ``.metadata`` file (which rank holds which
slice of every tensor), so a checkpoint loads into any layout: each rank reads only the slices it needs. torch's
reader unpickles ``.metadata`` and the non-tensor values (e.g. optimizer hyperparameters) with plain ``pickle``;
the reader here accepts only the classes DCP's metadata is made of, and loads values with
``torch.load(weights_only=True)``, so a crafted checkpoint cannot run code (as the rest of a switchformer
checkpoint is read).
"""

from __future__ import annotations

import contextlib
import io
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from switchformer.errors import CheckpointError

METADATA_FILE = ".metadata"

# What DCP's .metadata pickle is made of (module, name); anything else is refused.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


def is_dcp_folder(path: Path | str) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_CLASSES or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with a restricted unpickler for ``.metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(self.path) / METADATA_FILE
        try:
            with path.open("rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as error:
            raise CheckpointError(f"{path} is not a checkpoint's metadata ({error})") from error
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _load_bytes_safely(planner: DefaultLoadPlanner, read_item: ReadItem, value: io.BytesIO) -> None:
    try:
        loaded = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as error:  # torch's message goes on to suggest weights_only=False: not here
        reason = next((line.strip() for line in str(error).splitlines() if "Unpickler error" in line), str(error))
        raise CheckpointError(f"the value {read_item.dest_index.fqn} is not plain data ({reason})") from None
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], loaded)
    else:
        planner.state_dict[read_item.dest_index.fqn] = loaded


class SafeLoadPlanner(DefaultLoadPlanner):
    """Loads non-tensor values with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_bytes_safely(self, read_item, value)


class _SafeEmptyLoadPlanner(_EmptyStateDictLoadPlanner):
    """Rebuilds a whole state dict from the metadata (one process), loading values safely."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_bytes_safely(self, read_item, value)


@contextlib.contextmanager
def _refusals_as_checkpoint_errors(path: Path | str) -> Iterator[None]:
    """DCP gathers every rank's failure (a refused ``.metadata``, a refused value) into a ``CheckpointException``,
    a ``BaseException`` that no caller expects; raise the :class:`CheckpointError` the other readers raise."""
    try:
        yield
    except CheckpointException as error:
        reasons = sorted({str(failure) for failure, _ in error.failures.values()})
        raise CheckpointError(f"could not read the sharded checkpoint {path}: {'; '.join(reasons)}") from None


def load_sharded(state: dict[str, Any], path: Path | str, *, process_group: Any = None, no_dist: bool = False) -> None:
    """Fill ``state`` (tensors or DTensors laid out as this rank holds them) from the DCP folder ``path`` (a collective
    unless ``no_dist``; every rank raises the same :class:`CheckpointError` if any rank's read is refused)."""
    reader = SafeFileSystemReader(path)
    with _refusals_as_checkpoint_errors(path):
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), process_group=process_group, no_dist=no_dist)


def read_whole(path: Path | str, keys: set[str] | None = None) -> dict[str, Any]:
    """The whole state of the DCP folder ``path`` (or of its top-level ``keys``), in this process's memory."""
    state: dict[str, Any] = {}
    # DCP's own whole-folder reader (format_utils.dcp_to_torch_save) calls the loader directly, as here: dcp.load
    # only fills the keys its argument already has.
    reader, planner = SafeFileSystemReader(path), _SafeEmptyLoadPlanner(keys=keys)
    with _refusals_as_checkpoint_errors(path):
        _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
    return state


def tensor_shapes(path: Path | str, prefix: str = "") -> dict[str, torch.Size]:
    """Global shapes of the tensors stored under ``prefix`` (e.g. ``"model."``), read from the metadata only."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = SafeFileSystemReader(path).read_metadata()
    return {
        key[len(prefix) :]: entry.size
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }

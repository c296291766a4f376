"""Streaming loads: a checkpoint's safetensors read tensor by tensor into a model that holds no other copy.

The model is built on the meta device, cast to the wanted dtype and allocated empty; then each of our parameters
is filled from the external tensors the key map names (``key_map.ParamMapping``), one at a time, reading only the
block of each that this process holds: under expert parallelism a rank reads its experts only, under FSDP2 its
rows (``safe_open(...).get_slice``), a piece at a time (an expert, or some MiB of rows). Each file is opened for one
read and closed again, so the pages read are never all mapped at once: peak memory is the model in its dtype plus
one piece.

Shape legend: E experts, A/B the two axes of a matrix.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from switchformer.errors import CheckpointError
from switchformer.interop.files import SAFETENSORS, SAFETENSORS_INDEX, read_json
from switchformer.interop.key_map import ParamMapping, Transform, check_sources, join, joined
from switchformer.local_blocks import local_block

Block = tuple[slice, ...]
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclasses.dataclass
class SafetensorsFiles:
    """Where each tensor of a safetensors checkpoint (one file, or shards with an index) lives; reads slices."""

    folder: Path
    file_of: dict[str, str]
    bytes_read: int = 0  # tensor bytes requested so far (what a rank's share costs)
    _compared: dict[tuple[str, str], bool] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, folder: Path) -> SafetensorsFiles | None:
        """The checkpoint's safetensors, or None for a folder without (a ``.bin`` or sharded training one)."""
        if (folder / SAFETENSORS).is_file():
            with _opened(folder / SAFETENSORS) as handle:
                return cls(folder, dict.fromkeys(handle.keys(), SAFETENSORS))
        if (folder / SAFETENSORS_INDEX).is_file():
            weight_map = read_json(folder / SAFETENSORS_INDEX).get("weight_map")
            names = weight_map.values() if isinstance(weight_map, dict) else ()
            if not names or any(not isinstance(f, str) or Path(f).name != f for f in names):
                raise CheckpointError(f"{folder / SAFETENSORS_INDEX}: no valid 'weight_map' naming each shard")
            return cls(folder, dict(weight_map))
        return None

    def keys(self) -> Iterable[str]:
        return self.file_of.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        with _opened(self._path(name)) as handle:
            return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        with _opened(self._path(name)) as handle:
            stored = handle.get_slice(name).get_dtype()
        if stored not in _DTYPES:
            raise CheckpointError(
                f"{self.folder}: {name} is stored as {stored}; this loader reads {', '.join(_DTYPES)} weights "
                "(convert the checkpoint, e.g. with transformers, to one of them)"
            )
        return _DTYPES[stored]

    def same(self, a: str, b: str, rows: int = 4096) -> bool:
        """Whether tensors ``a`` and ``b`` hold the same values, compared ``rows`` rows at a time (tied tables);
        each pair is read once."""
        pair = (a, b) if a <= b else (b, a)
        if pair not in self._compared:
            self._compared[pair] = self._equal(a, b, rows)
        return self._compared[pair]

    def _equal(self, a: str, b: str, rows: int) -> bool:
        shape = self.shape(a)
        if shape != self.shape(b):
            return False
        for start in range(0, shape[0] if shape else 1, rows):
            block = (slice(start, start + rows),) if shape else None
            if not torch.equal(self.read(a, block), self.read(b, block)):
                return False
        return True

    def read(self, name: str, block: Block | None = None) -> torch.Tensor:
        """Tensor ``name``, or its ``block`` (basic slices, one per leading dimension)."""
        with _opened(self._path(name)) as handle:
            tensor = handle.get_tensor(name) if block is None else handle.get_slice(name)[block]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def _path(self, name: str) -> Path:
        if name not in self.file_of:
            raise CheckpointError(f"{self.folder}: no tensor {name!r} in the checkpoint")
        return self.folder / self.file_of[name]


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """``safe_open`` with a damaged, crafted or missing file (or tensor) reported as a :class:`CheckpointError`."""
    try:
        with safe_open(str(path), "pt") as handle:
            yield handle
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weight file not found") from None
    except (SafetensorError, OSError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot read weights ({type(error).__name__}: {error})") from None


def check_streamable(
    shapes: Mapping[str, torch.Size],
    mappings: list[ParamMapping],
    files: SafetensorsFiles,
    *,
    source: str,
    ignorable=lambda key: False,
) -> None:
    """Before anything is read: the files hold every tensor the mappings name and nothing unexpected, and each
    of our parameters (``shapes``, the whole model's) gets the shape it needs."""
    check_sources(files.keys(), mappings, source=source, ignorable=ignorable)
    for mapping in mappings:
        parts = [torch.empty(files.shape(name), device="meta") for name in mapping.external]
        joined(mapping, parts, shapes[mapping.ours], source=source)


@torch.no_grad()
def stream_into(model: torch.nn.Module, mappings: list[ParamMapping], files: SafetensorsFiles, *, source: str) -> None:
    """Fill every parameter of ``model`` (allocated, possibly sharded) from ``files`` through ``mappings``."""
    params = dict(model.named_parameters())
    missing = sorted(params.keys() - {m.ours for m in mappings})
    if missing:
        raise CheckpointError(f"{source}: the key map names no source for {missing[:5]}")
    for mapping in mappings:
        param = params[mapping.ours]
        local, offset = local_block(param)
        if local.numel() == 0:
            continue
        block = tuple(slice(o, o + n) for o, n in zip(offset, local.shape, strict=True))
        try:
            _fill_block(files, mapping, local, block, tuple(param.shape))
        except (CheckpointError, torch.OutOfMemoryError):  # a damaged file names itself; memory is not the file's
            raise
        except (RuntimeError, ValueError, IndexError) as error:
            raise CheckpointError(f"{source}: {mapping.ours} does not fit the checkpoint's tensors ({error})") from None


def _fill_block(
    files: SafetensorsFiles, mapping: ParamMapping, out: torch.Tensor, block: Block, shape: tuple[int, ...]
) -> None:
    """Write the ``block`` of our tensor (of ``shape``) into ``out``, reading only the parts of the external tensors
    it is made of, a piece at a time: an expert, up to ``_PIECE_BYTES`` of a matrix's rows, or one half of a fused
    gated matrix. T5X's kernel layouts, which no streamed checkpoint uses, read their parts whole."""
    parts = mapping.external
    match mapping.transform:
        case Transform.COPY if not block:  # a scalar
            out.copy_(files.read(parts[0]))
        case Transform.COPY:
            for rows, out_rows in _row_pieces(block, out):
                out[out_rows].copy_(files.read(parts[0], (rows, *block[1:])))
        case Transform.TRANSPOSE:  # ours[r, c] = external[c, r]
            for rows, out_rows in _row_pieces(block, out):
                out[out_rows].copy_(files.read(parts[0], (block[1], rows)).T)
        case Transform.STACK_T:  # ours[e] = part_e.T
            experts, rows, cols = block
            for i, e in enumerate(range(experts.start, experts.stop)):
                out[i].copy_(files.read(parts[e], (cols, rows)).T)
        case Transform.STACK_T_GATED:  # ours[e] = [gate_e.T | linear_e.T] along the last axis
            experts, rows, cols = block
            for i, e in enumerate(range(experts.start, experts.stop)):
                at = 0
                for h, piece in _halves(cols, shape[-1] // 2):
                    width = piece.stop - piece.start
                    out[i, :, at : at + width].copy_(files.read(parts[2 * e + h], (piece, rows)).T)
                    at += width
        case Transform.CONCAT_ROWS:  # ours = [gate; linear] along the rows
            rows, cols = block
            at = 0
            for h, piece in _halves(rows, shape[0] // 2):
                height = piece.stop - piece.start
                out[at : at + height].copy_(files.read(parts[h], (piece, cols)))
                at += height
        case _:  # whole parts (T5X's layouts)
            out.copy_(join(mapping.transform, [files.read(name) for name in parts])[block])


_PIECE_BYTES = 16 * 2**20  # rows read at once from a large matrix (an embedding table)


def _row_pieces(block: Block, out: torch.Tensor) -> list[tuple[slice, slice]]:
    """``block``'s leading range cut into pieces of about ``_PIECE_BYTES``: (rows in the tensor, rows of ``out``)."""
    row_bytes = max(out[0].numel() * 8, 1)  # stored in at most 8 bytes an element
    step = max(_PIECE_BYTES // row_bytes, 1)
    first = block[0].start
    return [
        (slice(start, min(start + step, block[0].stop)), slice(start - first, min(start + step, block[0].stop) - first))
        for start in range(first, block[0].stop, step)
    ]


def _halves(span: slice, half: int) -> list[tuple[int, slice]]:
    """Which of two concatenated halves of length ``half`` the range ``span`` covers, as (half, local range)."""
    pieces = []
    for h in (0, 1):
        start, stop = max(span.start - h * half, 0), min(span.stop - h * half, half)
        if start < stop:
            pieces.append((h, slice(start, stop)))
    return pieces

"""Weights pre-packed for the CPU matrix library (oneDNN), for decoding.

A decoding step multiplies a few rows by every weight it reads. The default CPU matmul packs its operands on every
call, so for a handful of rows it streams a weight far below memory bandwidth; oneDNN can pack a weight once into
its own blocked layout and then read it near memory speed (the path torch's CPU inference compiler takes when it
freezes weights). Rates for 1-8 rows and the decoding steps they make: ``bench/bench_generation.py``,
``docs/results/generation/``.

A packed copy is made on a weight's first use and kept until the weight changes in place (its version counter
moves), is replaced, or :meth:`PrepackedWeights.clear` drops them all. Results equal ``F.linear``'s to float32
rounding (the library sums in another order).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
import torch.nn.functional as F
from torch import nn


def prepack_applies(weight: torch.Tensor) -> bool:
    """Whether oneDNN can pack ``weight``: a plain (unsharded) CPU tensor in float32, or bf16 where the CPU has it."""
    if type(weight) not in (torch.Tensor, nn.Parameter) or weight.device.type != "cpu" or weight.dim() < 2:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@dataclasses.dataclass
class _Entry:
    owner: weakref.ref  # the parameter the packed matrices were made from
    data_ptr: int
    version: int
    matrices: dict[int, torch.Tensor]  # index (an expert, or 0) -> packed [out, in] matrix
    nbytes: int = 0  # bytes of the matrices packed (as their source)

    def made_from(self, weight: torch.Tensor) -> bool:
        """Whether the matrices were packed from ``weight`` as it is now (same tensor, memory and version)."""
        return self.owner() is weight and self.data_ptr == weight.data_ptr() and self.version == weight._version


class PrepackedWeights:
    """Packed copies of a model's weights, made on first use, keyed by the parameter they came from."""

    def __init__(self, rows_hint: int = 4) -> None:
        self.rows_hint = rows_hint  # rows oneDNN tunes the layout for (decoding steps have a few)
        self._entries: dict[int, _Entry] = {}

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight)`` (``weight`` is ``[out, in]``) with ``weight``'s packed copy."""
        return self._apply(x, weight, 0, weight)

    def expert_product(self, x: torch.Tensor, stacked: torch.Tensor, expert: int) -> torch.Tensor:
        """``x @ stacked[expert]`` for experts stacked as ``[E, in, out]``, with that expert's packed copy."""
        return self._apply(x, stacked, expert, stacked[expert].t())

    def prune(self) -> None:
        """Drop the copies of weights that are gone or have changed since they were packed."""
        for key, entry in list(self._entries.items()):
            weight = entry.owner()
            if weight is None or not entry.made_from(weight):
                del self._entries[key]

    def clear(self) -> None:
        """Drop every packed copy (the memory they hold goes back)."""
        self._entries.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of the packed copies held (as the weights they came from)."""
        return sum(entry.nbytes for entry in self._entries.values())

    def _apply(self, x: torch.Tensor, weight: torch.Tensor, index: int, matrix: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, matrix)`` with the packed copy of ``matrix``, part ``index`` of parameter ``weight``."""
        if x.dtype != matrix.dtype or x.shape[-1] != matrix.shape[-1]:
            return F.linear(x, matrix)  # let torch raise (or promote) exactly as it would
        packed = self._packed(weight, index, matrix)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    def _packed(self, weight: torch.Tensor, index: int, matrix: torch.Tensor) -> torch.Tensor:
        entry = self._entries.get(id(weight))
        if entry is None or not entry.made_from(weight):
            entry = _Entry(weakref.ref(weight), weight.data_ptr(), weight._version, {})
            self._entries[id(weight)] = entry
        if index not in entry.matrices:
            source = matrix.contiguous()
            entry.matrices[index] = torch.ops.mkldnn._reorder_linear_weight(source, self.rows_hint)
            entry.nbytes += source.numel() * source.element_size()
        return entry.matrices[index]


_COPIES: weakref.WeakKeyDictionary[nn.Module, PrepackedWeights] = weakref.WeakKeyDictionary()


def packed_copies_of(model: nn.Module) -> PrepackedWeights:
    """The packed copies kept for ``model`` (created empty); they go when the model does."""
    if model not in _COPIES:
        _COPIES[model] = PrepackedWeights()
    return _COPIES[model]


def drop_packed_copies(model: nn.Module) -> None:
    """Drop the packed copies kept for ``model``, if any."""
    copies = _COPIES.pop(model, None)
    if copies is not None:
        copies.clear()


class PrepackedLinear(nn.Module):
    """An ``nn.Linear`` without bias that multiplies by its weight's packed copy (inference only)."""

    def __init__(self, linear: nn.Linear, weights: PrepackedWeights) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PrepackedLinear takes bias-free linear layers (every projection of a T5 stack)")
        self.linear = linear
        self.weights = weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights.linear(x, self.linear.weight)

"""Key/value caches for incremental decoding.

Self-attention keys and values grow by one position per decoding step. They live in buffers with room for more
positions: a step writes its position in place, and a full buffer is replaced by one twice as long, so decoding
``L`` tokens copies ``O(L)`` positions in all, where concatenating at every step copies ``O(L^2)`` and allocates
new tensors every step. Cross-attention keys and values are computed once from the encoder output and never grow.

Shape legend: B batch rows, H heads, L cached positions, N new positions, K d_kv, P buffer capacity (>= L).
"""

from __future__ import annotations

import dataclasses

import torch

MIN_CAPACITY = 16  # positions a new buffer has room for at least


@dataclasses.dataclass
class _Buffers:
    """Storage shared by the :class:`LayerKV` views of one growing cache."""

    key: torch.Tensor  # [B, H, P, d_kv]
    value: torch.Tensor  # [B, H, P, d_kv]
    filled: int  # positions written; a view of fewer positions that appends branches off and must copy

    @property
    def capacity(self) -> int:
        return self.key.shape[2]


@dataclasses.dataclass
class LayerKV:
    key: torch.Tensor  # [B, H, L, d_kv]
    value: torch.Tensor  # [B, H, L, d_kv]
    buffers: _Buffers | None = dataclasses.field(default=None, repr=False, compare=False)  # room to grow in place

    @property
    def length(self) -> int:
        return self.key.shape[2]

    def append(self, key_BHNK: torch.Tensor, value_BHNK: torch.Tensor) -> LayerKV:
        """These positions followed by the new ones; ``self`` keeps seeing only its own positions."""
        length, new = self.length, key_BHNK.shape[2]
        buffers = self.buffers
        if buffers is None or buffers.filled != length or length + new > buffers.capacity:
            buffers = self._moved_to_new_buffers(max(MIN_CAPACITY, 2 * (length + new)))
        buffers.key[:, :, length : length + new] = key_BHNK
        buffers.value[:, :, length : length + new] = value_BHNK
        buffers.filled = length + new
        return _view(buffers, length + new)

    def reorder(self, index: torch.Tensor) -> LayerKV:
        """Select batch rows (beam search keeps the caches of the surviving beams), into buffers of the same room."""
        if self.buffers is None:
            return LayerKV(self.key.index_select(0, index), self.value.index_select(0, index))
        shape = (index.numel(), *self.buffers.key.shape[1:])
        buffers = _Buffers(self.key.new_empty(shape), self.value.new_empty(shape), self.length)
        torch.index_select(self.key, 0, index, out=buffers.key[:, :, : self.length])
        torch.index_select(self.value, 0, index, out=buffers.value[:, :, : self.length])
        return _view(buffers, self.length)

    def _moved_to_new_buffers(self, capacity: int) -> _Buffers:
        batch, heads, length, d_kv = self.key.shape
        shape = (batch, heads, capacity, d_kv)
        buffers = _Buffers(self.key.new_empty(shape), self.value.new_empty(shape), length)
        buffers.key[:, :, :length] = self.key
        buffers.value[:, :, :length] = self.value
        return buffers


def _view(buffers: _Buffers, length: int) -> LayerKV:
    return LayerKV(buffers.key[:, :, :length], buffers.value[:, :, :length], buffers)


@dataclasses.dataclass
class DecoderCache:
    """Per-layer self-attention keys/values (grown each step) and cross-attention ones (computed once)."""

    self_attention: list[LayerKV | None]
    cross_attention: list[LayerKV | None]

    @classmethod
    def empty(cls, num_layers: int) -> DecoderCache:
        return cls([None] * num_layers, [None] * num_layers)

    @property
    def length(self) -> int:
        """Number of positions already cached."""
        first = self.self_attention[0] if self.self_attention else None
        return 0 if first is None else first.length

    def reorder(self, index: torch.Tensor) -> DecoderCache:
        """Select batch rows (any rows: both the self- and the cross-attention caches follow)."""
        return DecoderCache(_reorder(self.self_attention, index), _reorder(self.cross_attention, index))

    def reorder_beams(self, index: torch.Tensor) -> DecoderCache:
        """Select rows among the beams of each input, as beam search does at every step.

        A row then only ever takes the place of a beam of the same input, whose cross-attention keys and values
        (computed from the same encoder output) are its own: those stay where they are, uncopied.
        """
        return DecoderCache(_reorder(self.self_attention, index), self.cross_attention)


def _reorder(layers: list[LayerKV | None], index: torch.Tensor) -> list[LayerKV | None]:
    return [None if kv is None else kv.reorder(index) for kv in layers]

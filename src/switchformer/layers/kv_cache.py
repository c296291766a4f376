"""Key/value caches for incremental decoding.

Self-attention keys and values grow by one position per decoding step. They live in buffers with room for more
positions: a step writes its position in place, and a full buffer is replaced by one twice as long, so decoding
``L`` tokens copies ``O(L)`` positions in all, where concatenating at every step copies ``O(L^2)`` and allocates
new tensors every step. Cross-attention keys and values are computed once from the encoder output and never grow.

A compiled decoding step needs the same shapes at every step: :class:`StaticDecoderCache` keeps every layer's
self-attention keys and values in buffers of a fixed number of positions, writes a step's positions at an offset
held in a tensor, and leaves the positions not yet written to the attention mask.

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


@dataclasses.dataclass
class StaticLayerKV:
    """Self-attention keys and values in buffers of a fixed number of positions ``P``; attention reads all of them,
    and the mask blocks those past the ones written."""

    key: torch.Tensor  # [B, H, P, d_kv]
    value: torch.Tensor  # [B, H, P, d_kv]
    position: torch.Tensor  # [] int64: the first position the next append writes

    @property
    def capacity(self) -> int:
        return self.key.shape[2]

    def append(self, key_BHNK: torch.Tensor, value_BHNK: torch.Tensor) -> StaticLayerKV:
        """Write the new positions in place (at ``position``); the buffers, all ``P`` positions, are the result."""
        index_N = self.position + torch.arange(key_BHNK.shape[2], device=self.key.device)
        self.key.index_copy_(2, index_N, key_BHNK.to(self.key.dtype))
        self.value.index_copy_(2, index_N, value_BHNK.to(self.value.dtype))
        return self


@dataclasses.dataclass
class StaticDecoderCache(DecoderCache):
    """A :class:`DecoderCache` of fixed shapes for a compiled decoding step: one new position per step."""

    self_attention: list[StaticLayerKV]  # type: ignore[assignment]
    position: torch.Tensor  # [] int64 positions written so far (the next step's query position)

    @classmethod
    def from_cache(cls, cache: DecoderCache, capacity: int) -> StaticDecoderCache:
        """The keys and values of ``cache`` (all its layers the same length) copied into buffers of ``capacity``
        positions; the cross-attention ones are shared, not copied."""
        length = cache.length
        if capacity < length:
            raise ValueError(f"a static cache of {capacity} positions cannot hold the {length} already cached")
        position = torch.tensor(length, device=_first_key(cache).device)
        layers = []
        for kv in cache.self_attention:
            assert kv is not None, "every decoder layer caches its keys and values"
            batch, heads, _, d_kv = kv.key.shape
            key = kv.key.new_zeros(batch, heads, capacity, d_kv)
            value = kv.value.new_zeros(batch, heads, capacity, d_kv)
            key[:, :, :length], value[:, :, :length] = kv.key, kv.value
            layers.append(StaticLayerKV(key, value, position))
        return cls(layers, list(cache.cross_attention), position)

    @property
    def length(self) -> int:
        return int(self.position)

    @property
    def capacity(self) -> int:
        return self.self_attention[0].capacity

    def advanced(self, new: int = 1) -> StaticDecoderCache:
        """The same buffers, after a step has written ``new`` positions."""
        position = self.position + new
        layers = [StaticLayerKV(kv.key, kv.value, position) for kv in self.self_attention]
        return StaticDecoderCache(layers, self.cross_attention, position)

    def reorder(self, index: torch.Tensor) -> StaticDecoderCache:
        return StaticDecoderCache(self._rows(index), _reorder(self.cross_attention, index), self.position)

    def reorder_beams(self, index: torch.Tensor) -> StaticDecoderCache:
        """As :meth:`DecoderCache.reorder_beams`: the cross-attention keys and values stay where they are."""
        return StaticDecoderCache(self._rows(index), self.cross_attention, self.position)

    def _rows(self, index: torch.Tensor) -> list[StaticLayerKV]:
        return [
            StaticLayerKV(kv.key.index_select(0, index), kv.value.index_select(0, index), self.position)
            for kv in self.self_attention
        ]


def _first_key(cache: DecoderCache) -> torch.Tensor:
    first = cache.self_attention[0]
    assert first is not None, "an empty cache has nothing to copy"
    return first.key


def _reorder(layers: list[LayerKV | None], index: torch.Tensor) -> list[LayerKV | None]:
    return [None if kv is None else kv.reorder(index) for kv in layers]

"""Key/value caches for incremental decoding."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class LayerKV:
    key: torch.Tensor  # [B, H, L, d_kv]
    value: torch.Tensor  # [B, H, L, d_kv]

    def reorder(self, index: torch.Tensor) -> LayerKV:
        return LayerKV(self.key.index_select(0, index), self.value.index_select(0, index))


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
        return 0 if first is None else first.key.shape[2]

    def reorder(self, index: torch.Tensor) -> DecoderCache:
        """Select batch rows (beam search keeps the caches of the surviving beams)."""
        return DecoderCache(
            [None if kv is None else kv.reorder(index) for kv in self.self_attention],
            [None if kv is None else kv.reorder(index) for kv in self.cross_attention],
        )

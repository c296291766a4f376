"""T5 relative position bias: learned per-head scalars over log-spaced relative-distance buckets.

Computed once per stack (by its first layer in T5) and shared by all of the stack's self-attention layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Map ``key_pos - query_pos`` to a bucket: exact for short distances, logarithmic up to ``max_distance``.

    Bidirectional attention spends half the buckets on each direction; causal attention only sees the past.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    def __init__(self, num_heads: int, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, query_length: int, key_length: int, *, query_offset: int | torch.Tensor = 0) -> torch.Tensor:
        """Bias ``[1, H, query_length, key_length]``; queries start at absolute position ``query_offset`` (an int, or
        a ``[]`` tensor for shapes that do not change with the position)."""
        device = self.embedding.weight.device
        query_pos = torch.arange(query_length, device=device)[:, None] + query_offset
        key_pos = torch.arange(key_length, device=device)[None, :]
        bucket = relative_position_bucket(
            key_pos - query_pos,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.embedding(bucket).permute(2, 0, 1).unsqueeze(0)

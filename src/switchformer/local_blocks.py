"""The block of a weight that this process holds: all of a plain tensor, or a DTensor's local shard and where it
starts in the whole weight. Filling a sharded model (seeded initialisation, streaming a checkpoint) goes through
this, so each process touches only its own rows."""

from __future__ import annotations

import torch


def local_block(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The tensor this process holds of ``param`` and where it starts in the whole weight (one index per dim).

    Every layout here gives a rank one contiguous block of each weight (experts split on dim 0, FSDP shards on
    dim 0, or on dim 1 for expert slices of fewer experts than shards)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param.data, (0,) * param.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), tuple(int(o) for o in offset)

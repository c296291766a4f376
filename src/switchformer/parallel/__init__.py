"""Sharded training on ``torch.distributed``: one DeviceMesh, expert parallelism and FSDP2, applied from outside to a
single-device model.

Typical use on every rank (launched by torchrun)::

    layout = init_parallel(ParallelDims(dp_shard=2, expert_parallel=2))  # the mesh from torchrun's environment
    model = build_model(cfg, device="meta")                              # nothing allocated yet
    apply_expert_parallel(model, layout)     # this rank's experts (DTensors), the all-to-all dispatcher
    apply_fsdp(model, layout)                # dense weights and expert slices sharded by FSDP2
    materialize(model, layout.device, seed=0)  # this rank's shards, the weights one process would have
    optimizer = torch.optim.AdamW(model.parameters())  # or ShardedAdafactor
    with sliced_batch(batch_slice(layout)):  # routing groups longer than a slice route as in one process
        out = model(**slice_global_batch(batch, layout))
    out.loss.backward()
    clip_grad_norm_(model, 1.0, layout); optimizer.step()

(``sliced_batch`` is :func:`switchformer.moe.batch_slices.sliced_batch`.)
"""

from switchformer.parallel.adafactor import ShardedAdafactor
from switchformer.parallel.collectives import CollectiveError
from switchformer.parallel.data_parallel import batch_slice, clip_grad_norm_, mean_over_ranks, slice_global_batch
from switchformer.parallel.expert_parallel import (
    AllToAllDispatcher,
    AllToAllState,
    ExpertShard,
    apply_expert_parallel,
    expert_shards,
)
from switchformer.parallel.fsdp import ShardingOptions, apply_fsdp
from switchformer.parallel.materialize import materialize
from switchformer.parallel.mesh import (
    DEFAULT_TIMEOUT,
    Backend,
    ParallelDims,
    ParallelLayout,
    build_layout,
    close_parallel,
    init_parallel,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "AllToAllDispatcher",
    "AllToAllState",
    "Backend",
    "CollectiveError",
    "ExpertShard",
    "ParallelDims",
    "ParallelLayout",
    "ShardedAdafactor",
    "ShardingOptions",
    "apply_expert_parallel",
    "apply_fsdp",
    "batch_slice",
    "build_layout",
    "clip_grad_norm_",
    "close_parallel",
    "expert_shards",
    "init_parallel",
    "materialize",
    "mean_over_ranks",
    "slice_global_batch",
]

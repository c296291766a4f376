"""Expert and data parallelism on ``torch.distributed``, applied to a single-device model from outside.

Typical use on every rank (launched by torchrun)::

    layout = init_parallel(ep=2)                      # process groups from torchrun's environment
    torch.manual_seed(seed); model = build_model(cfg)  # the same full model on every rank
    apply_expert_parallel(model, layout)               # keep this rank's experts, swap in the all-to-all dispatcher
    optimizer = build_optimizer(model, config, layout=layout)  # over the sharded parameters
    out = model(**slice_global_batch(batch, layout)); out.loss.backward()
    sync_gradients(model, layout); clip_grad_norm_(model, 1.0, layout); optimizer.step()
"""

from switchformer.parallel.checkpoint import (
    ShardMismatchError,
    gather_full_optimizer_state,
    gather_full_state_dict,
    load_full_optimizer_state,
    load_full_state_dict,
)
from switchformer.parallel.collectives import CollectiveError
from switchformer.parallel.data_parallel import clip_grad_norm_, mean_over_ranks, slice_global_batch, sync_gradients
from switchformer.parallel.expert_parallel import (
    AllToAllDispatcher,
    AllToAllState,
    ExpertShard,
    apply_expert_parallel,
    expert_shards,
)
from switchformer.parallel.mesh import (
    DEFAULT_TIMEOUT,
    Backend,
    ParallelLayout,
    build_layout,
    check_layout,
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
    "ParallelLayout",
    "ShardMismatchError",
    "apply_expert_parallel",
    "build_layout",
    "check_layout",
    "clip_grad_norm_",
    "close_parallel",
    "expert_shards",
    "gather_full_optimizer_state",
    "gather_full_state_dict",
    "init_parallel",
    "load_full_optimizer_state",
    "load_full_state_dict",
    "mean_over_ranks",
    "slice_global_batch",
    "sync_gradients",
]

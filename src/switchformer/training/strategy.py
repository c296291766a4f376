"""How a training step is executed: in one process, or sharded over ranks (FSDP2 + expert parallelism).

The trainer calls the same methods either way; :class:`DistributedStrategy` turns them into the pieces of
``switchformer.parallel`` so that a run over ``W`` ranks computes what one process computes on the same global
batch (see ``parallel/data_parallel.py`` for the gradient arithmetic). Every rank draws the same global batch and
keeps its slice; loss figures are averaged over ranks; only the main rank writes files (checkpoints excepted:
every rank writes its shards).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from switchformer.models.base import SwitchModelBase
from switchformer.moe.batch_slices import BatchSlice, sliced_batch
from switchformer.training.checkpoint import Checkpoint, load_model_state

Batch = dict[str, torch.Tensor]
WeightSource = Callable[[nn.Module], object]  # fills an allocated (possibly sharded) model's parameters in place


class SingleProcess:
    """The default: everything local."""

    world_size = 1
    rank = 0
    is_main = True
    layout: Any = None  # the ParallelLayout of a distributed run
    # Model replicas: the ranks of one replica hold one model between them and run every forward pass in lockstep
    # (e.g. decode the same examples); different replicas may decode different ones.
    replica = 0
    replicas = 1

    def prepare_model(
        self,
        model: SwitchModelBase,
        *,
        device: torch.device,
        seed: int,
        compute_dtype: torch.dtype | None = None,
        fill: WeightSource | None = None,
    ) -> nn.Module:
        """Move ``model`` to ``device``; a model on the meta device is allocated there and filled by ``fill`` (a
        checkpoint's :meth:`~switchformer.interop.checkpoint_io.OpenCheckpoint.fill`), or else initialised from
        ``seed`` (the weights ``build_model(config, seed=seed)`` gives). ``compute_dtype`` is what autocast computes
        in (bf16 or None); one process keeps its weights' precision and lets autocast cast."""
        _check_fill(model, fill)
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=device)
            if fill is not None:
                fill(model)
            else:
                model.reset_parameters(seed)
            return model
        return model.to(device)

    def seed_ranks(self, seed: int) -> None:
        """Called after the model is built; one process keeps its single random stream."""

    def barrier(self) -> None:
        """Nothing to wait for in one process."""

    def local_batch(self, batch: Batch) -> Batch:
        return batch

    def batch_slicing(self) -> contextlib.AbstractContextManager:
        """Around the forwards of :meth:`local_batch` slices: routing groups longer than a slice are routed as one
        process would (``switchformer.moe.batch_slices``). One process holds the whole batch."""
        return contextlib.nullcontext()

    def gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """Whether the coming backward should reduce gradients over ranks (off for all but the last micro-batch)."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf))

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def sum(self, values: list[float]) -> list[float]:
        return values

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights on the main rank (a collective under parallelism: every rank calls it; the
        others get an empty dict)."""
        return model.state_dict()

    def agree_to_stop(self, done: bool) -> bool:
        """Whether every rank that runs the same forward passes as this one is done (see ``generate``)."""
        return done

    def load_training_state(
        self, checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Load a checkpoint's weights (and optimizer state, if given) into ``model``; either checkpoint format."""
        load_model_state(model, checkpoint.model_state, source=checkpoint.path)
        state = checkpoint.optimizer_state
        if optimizer is None or state is None:
            return
        if any(isinstance(key, str) for key in state.get("state", {})):  # keyed by name: a sharded checkpoint's
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, state)
        else:
            optimizer.load_state_dict(state)

    def checkpointer(self, directory: Path, *, async_save: bool) -> Any:
        """None: one process writes one-file checkpoints (``training.checkpoint.save_checkpoint``)."""
        return None

    def rng_states(self) -> list[torch.Tensor]:
        return [torch.get_rng_state()]

    def restore_rng(self, states: list[torch.Tensor], *, seed: int, step: int) -> None:
        torch.set_rng_state(states[0])


class DistributedStrategy(SingleProcess):
    """FSDP2 over ``layout``'s mesh, with the Switch layers' experts split over its ``ep`` dimension."""

    def __init__(self, layout: Any) -> None:
        self.layout = layout
        self.world_size = layout.world_size
        self.rank = layout.rank
        self.is_main = layout.rank == 0
        self.replica = layout.replica
        self.replicas = layout.dims.dp_replicate
        self._slice: BatchSlice | None = None

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def prepare_model(
        self,
        model: SwitchModelBase,
        *,
        device: torch.device,
        seed: int,
        compute_dtype: torch.dtype | None = None,
        fill: WeightSource | None = None,
    ) -> nn.Module:
        """Split the experts, shard with FSDP2 (weights all-gathered in ``compute_dtype``, kept and reduced in
        their own precision; routers always float32), then (for a meta-device model) allocate only this rank's
        shards and fill them: from ``fill`` (a checkpoint read block by block, each rank its own), or with the
        weights ``seed`` gives one process."""
        from switchformer.parallel import ShardingOptions, apply_expert_parallel, apply_fsdp, materialize

        _check_fill(model, fill)
        meta = any(p.is_meta for p in model.parameters())
        if not meta:
            model = model.to(self.layout.device)
        apply_expert_parallel(model, self.layout)
        apply_fsdp(model, self.layout, ShardingOptions(param_dtype=compute_dtype))
        if meta and fill is not None:
            model.to_empty(device=self.layout.device)
            fill(model)
        elif meta:
            materialize(model, self.layout.device, seed=seed)
        return model

    def seed_ranks(self, seed: int) -> None:
        # Dropout draws its own stream per rank (statistically what one process does, not bit-equal); router
        # jitter does not depend on the layout (switchformer.moe.router).
        torch.manual_seed(seed + self.rank)

    def local_batch(self, batch: Batch) -> Batch:
        from switchformer.parallel import slice_global_batch

        return slice_global_batch(batch, self.layout)

    def batch_slicing(self) -> contextlib.AbstractContextManager:
        from switchformer.parallel.data_parallel import batch_slice

        if self._slice is None:
            self._slice = batch_slice(self.layout)
        return sliced_batch(self._slice)

    def gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        from switchformer.parallel.fsdp import set_gradient_sync

        set_gradient_sync(model, enabled)

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float:
        from switchformer.parallel import clip_grad_norm_

        return float(clip_grad_norm_(model, max_norm or math.inf, self.layout))

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        from switchformer.parallel import mean_over_ranks

        averaged = mean_over_ranks(torch.tensor(list(values.values()), dtype=torch.float64), self.layout)
        return dict(zip(values, averaged.tolist(), strict=True))

    def sum(self, values: list[float]) -> list[float]:
        from switchformer.parallel import mean_over_ranks

        return (mean_over_ranks(torch.tensor(values, dtype=torch.float64), self.layout) * self.world_size).tolist()

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def agree_to_stop(self, done: bool) -> bool:
        import torch.distributed as dist

        from switchformer.parallel.collectives import collective

        group = self.layout.shard_group
        flag = torch.tensor([int(done)], device=self.layout.device)
        with collective("the all-reduce agreeing to stop decoding", group):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return bool(flag.item())

    def load_training_state(
        self, checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Each rank reads its shards of ``checkpoint`` (read without its weights), whatever layout wrote it."""
        from switchformer.training.sharded_checkpoint import load_into_sharded

        load_into_sharded(checkpoint.path, model, optimizer)

    def checkpointer(self, directory: Path, *, async_save: bool) -> Any:
        from switchformer.training.sharded_checkpoint import ShardedCheckpointer

        return ShardedCheckpointer(directory, async_save=async_save, timeout=self.layout.timeout)

    def rng_states(self) -> list[torch.Tensor]:
        import torch.distributed as dist

        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, torch.get_rng_state())
        return states

    def restore_rng(self, states: list[torch.Tensor], *, seed: int, step: int) -> None:
        if len(states) == self.world_size:
            torch.set_rng_state(states[self.rank])
        else:  # resumed at another world size: fresh, distinct streams per rank
            torch.manual_seed(seed + self.rank + 1_000_003 * step)


def _check_fill(model: nn.Module, fill: WeightSource | None) -> None:
    if fill is not None and not all(p.is_meta for p in model.parameters()):
        raise ValueError(
            "initial weights fill a model built on the meta device (build_model(config, device='meta')); this "
            "model already holds weights"
        )

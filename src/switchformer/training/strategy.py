"""How a training step is executed: in one process, or over ranks with expert and data parallelism.

The trainer calls the same methods either way; :class:`DistributedStrategy` turns them into the collectives of
``switchformer.parallel`` so that a run over ``W`` ranks computes what one process computes on the same global
batch (see ``parallel/data_parallel.py`` for the gradient arithmetic). Every rank draws the same global batch and
keeps its slice; loss figures are averaged over ranks; only the main rank writes files.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from switchformer.training.checkpoint import load_model_state

Batch = dict[str, torch.Tensor]


class SingleProcess:
    """The default: everything local."""

    world_size = 1
    rank = 0
    is_main = True
    layout: Any = None  # the ParallelLayout of a distributed run
    # Data-parallel coordinates: ranks that share a replica index hold one model between them (expert parallelism)
    # and must run the same forward passes in lockstep, e.g. decode the same examples.
    replica = 0
    replicas = 1

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def seed_ranks(self, seed: int) -> None:
        """Called after the model is built; one process keeps its single random stream."""

    def barrier(self) -> None:
        """Nothing to wait for in one process."""

    def local_batch(self, batch: Batch) -> Batch:
        return batch

    def synchronize_gradients(self, model: nn.Module) -> None:
        """Nothing to do in one process."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf))

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def sum(self, values: list[float]) -> list[float]:
        return values

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's weights as one process holds them (a collective under parallelism: every rank calls it)."""
        return model.state_dict()

    def agree_to_stop(self, done: bool) -> bool:
        """Whether every rank that runs the same forward passes as this one is done (see ``generate``)."""
        return done

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        return self.full_model_state(model), optimizer.state_dict()

    def load_full_state(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_state: dict,
        optimizer_state: dict | None,
        *,
        source: Any,
    ) -> None:
        load_model_state(model, model_state, source=source)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)

    def rng_states(self) -> list[torch.Tensor]:
        return [torch.get_rng_state()]

    def restore_rng(self, states: list[torch.Tensor], *, seed: int, step: int) -> None:
        torch.set_rng_state(states[0])


class DistributedStrategy(SingleProcess):
    """Expert parallelism over ``layout.ep_size`` ranks times data parallelism over ``layout.dp_size``."""

    def __init__(self, layout: Any) -> None:
        self.layout = layout
        self.world_size = layout.world_size
        self.rank = layout.rank
        self.is_main = layout.rank == 0
        self.replica = layout.dp_rank
        self.replicas = layout.dp_size

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.layout.dense_group)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        from switchformer.parallel import apply_expert_parallel

        return apply_expert_parallel(model.to(self.layout.device), self.layout)

    def seed_ranks(self, seed: int) -> None:
        # Each rank draws its own dropout and jitter noise (statistically what one process does, not bit-equal).
        torch.manual_seed(seed + self.rank)

    def local_batch(self, batch: Batch) -> Batch:
        from switchformer.parallel import slice_global_batch

        return slice_global_batch(batch, self.layout)

    def synchronize_gradients(self, model: nn.Module) -> None:
        from switchformer.parallel import sync_gradients

        sync_gradients(model, self.layout)

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
        from switchformer.parallel import gather_full_state_dict

        return gather_full_state_dict(model, self.layout)

    def agree_to_stop(self, done: bool) -> bool:
        if self.layout.ep_size == 1:
            return done  # a data-parallel rank decodes alone
        import torch.distributed as dist

        from switchformer.parallel.collectives import collective

        flag = torch.tensor([int(done)], device=self.layout.device)
        with collective("the all-reduce agreeing to stop decoding", self.layout.ep_group):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.layout.ep_group)
        return bool(flag.item())

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        from switchformer.parallel import gather_full_optimizer_state

        return self.full_model_state(model), gather_full_optimizer_state(optimizer, model, self.layout)

    def load_full_state(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_state: dict,
        optimizer_state: dict | None,
        *,
        source: Any,
    ) -> None:
        from switchformer.parallel import load_full_optimizer_state, load_full_state_dict

        load_full_state_dict(model, model_state, self.layout)
        if optimizer_state is not None:
            load_full_optimizer_state(optimizer, model, optimizer_state, self.layout)

    def rng_states(self) -> list[torch.Tensor]:
        import torch.distributed as dist

        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, torch.get_rng_state(), group=self.layout.dense_group)
        return states

    def restore_rng(self, states: list[torch.Tensor], *, seed: int, step: int) -> None:
        if len(states) == self.world_size:
            torch.set_rng_state(states[self.rank])
        else:  # resumed at another world size: fresh, distinct streams per rank
            torch.manual_seed(seed + self.rank + 1_000_003 * step)

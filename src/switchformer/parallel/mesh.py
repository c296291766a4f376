"""From torchrun's environment to process groups: one expert-parallel (EP) group and data-parallel (DP) groups.

The world of ``W = ep * dp`` ranks is laid out EP-major: ranks ``[d * ep, (d + 1) * ep)`` form EP group ``d`` and
together hold one copy of every expert (EP rank ``j`` holds the ``j``-th contiguous slice of each layer's
experts). Consecutive ranks share a node under torchrun, so the all-to-all traffic stays on the fastest links. The
ranks holding the same expert slice (``j, j + ep, j + 2 * ep, ...``) form that slice's expert-DP group; all
ranks form the DP group of the replicated (dense) parameters.

Fault behaviour: every collective waits at most ``timeout`` (``init_parallel(timeout=...)``, default
:data:`DEFAULT_TIMEOUT`). A rank whose peer died usually fails at once (gloo sees the connection close); a rank
whose peer hangs fails after ``timeout``; either raises :class:`~switchformer.parallel.CollectiveError`. (torchrun
also stops the remaining workers once one exits with an error.) Keep the timeout above the longest legitimate
wait between collectives, such as rank 0 writing a checkpoint while the others wait in the next step. The
timeout applies to the EP and DP groups and, when ``init_parallel`` creates it, to the default group. With NCCL,
torch enforces it through its asynchronous error handling (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default).
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import logging
import os

import torch
import torch.distributed as dist

from switchformer.config import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class Backend(enum.Enum):
    AUTO = "auto"  # nccl when CUDA is available, else gloo
    GLOO = "gloo"  # CPU tensors
    NCCL = "nccl"  # CUDA tensors


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits in the EP x DP mesh, and the process groups it talks over."""

    rank: int  # global rank
    world_size: int  # ep_size * dp_size
    local_rank: int  # rank on this node (the CUDA device index)
    ep_rank: int  # which slice of every layer's experts this rank holds
    ep_size: int  # ranks sharing one copy of all experts
    dp_rank: int  # which EP group this rank belongs to (= the replica index of its expert slice)
    dp_size: int  # number of EP groups (replicas of each expert slice)
    device: torch.device
    ep_group: dist.ProcessGroup | None  # the ep_size ranks exchanging tokens (all-to-all)
    expert_dp_group: dist.ProcessGroup | None  # the dp_size ranks holding the same expert slice
    dense_group: dist.ProcessGroup | None  # all ranks: replicated parameters are averaged here
    timeout: datetime.timedelta = DEFAULT_TIMEOUT


def check_layout(world_size: int, ep: int) -> int:
    """Return the data-parallel degree ``world_size // ep``; raise :class:`ConfigError` if ``ep`` does not fit."""
    if ep < 1:
        raise ConfigError(f"expert_parallel={ep!r} is invalid: must be >= 1")
    if world_size % ep:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ConfigError(
            f"expert_parallel={ep!r} is invalid: must divide the world size {world_size} "
            f"(world = expert_parallel * data_parallel); allowed: {divisors}"
        )
    return world_size // ep


def init_parallel(
    ep: int, *, backend: Backend = Backend.AUTO, timeout: datetime.timedelta = DEFAULT_TIMEOUT, command: str = "train"
) -> ParallelLayout:
    """Initialise the default process group from torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) and build the EP/DP groups.

    Every rank must call this with the same ``ep``. Reuses an already initialised default group. On CUDA it
    selects device ``LOCAL_RANK`` first, so NCCL binds each rank to its own GPU.
    """
    if not dist.is_initialized():
        missing = [name for name in _REQUIRED_ENV if name not in os.environ]
        if missing:
            flag = f" --expert-parallel {ep}" if ep > 1 else ""
            raise RuntimeError(
                f"running over several processes needs torchrun's environment; {', '.join(missing)} not set. Launch "
                f"with e.g. `torchrun --nproc-per-node {max(ep, 2)} -m switchformer {command}{flag} ...`"
            )
        check_layout(int(os.environ["WORLD_SIZE"]), ep)  # fail before connecting to anyone
        chosen = _resolve_backend(backend)
        if chosen is Backend.NCCL:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(chosen.value, init_method="env://", timeout=timeout)
    return build_layout(ep, timeout=timeout)


def build_layout(ep: int, *, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> ParallelLayout:
    """Create the EP and expert-DP groups over the initialised default group (a collective: all ranks call it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = check_layout(world, ep)
    ep_group = expert_dp_group = None
    # new_group is collective over the whole world: every rank creates every group, in the same order.
    for d in range(dp):
        group = dist.new_group(list(range(d * ep, (d + 1) * ep)), timeout=timeout)
        if rank // ep == d:
            ep_group = group
    for j in range(ep):
        group = dist.new_group(list(range(j, world, ep)), timeout=timeout)
        if rank % ep == j:
            expert_dp_group = group
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    layout = ParallelLayout(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        ep_rank=rank % ep,
        ep_size=ep,
        dp_rank=rank // ep,
        dp_size=dp,
        device=device,
        ep_group=ep_group,
        expert_dp_group=expert_dp_group,
        dense_group=dist.group.WORLD,
        timeout=timeout,
    )
    logger.info("rank %d/%d: expert-parallel %d x data-parallel %d on %s", rank, world, ep, dp, device)
    return layout


def close_parallel() -> None:
    """Destroy all process groups (call on every rank before exiting; gloo aborts a process that skips it)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _resolve_backend(backend: Backend) -> Backend:
    if backend is Backend.AUTO:
        return Backend.NCCL if torch.cuda.is_available() else Backend.GLOO
    return backend

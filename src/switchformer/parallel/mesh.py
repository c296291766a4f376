"""From torchrun's environment to one ``DeviceMesh`` with three dimensions: replicate, shard and expert.

The world of ``W = dp_replicate * dp_shard * expert_parallel`` ranks is one mesh of shape
``(dp_replicate, dp_shard, ep)``, row-major, so the ``ep`` ranks exchanging tokens are consecutive (on one node
under torchrun, where the all-to-all is fastest). Every rank trains on its own slice of the global batch (all
``W`` ranks are data-parallel). Parameters are laid out as torchtitan lays them out:

* dense parameters (embeddings, attention, routers, dense FFNs) are sharded by FSDP2 over the
  ``dp_shard * ep`` ranks (the flattened ``dp_shard_ep`` dimension) and replicated over ``dp_replicate`` (HSDP);
* each Switch layer's ``[E, ...]`` expert weights are split over ``ep`` (rank ``j`` holds experts
  ``[j * E / ep, (j + 1) * E / ep)``), and each slice is sharded by FSDP2 over ``dp_shard`` and replicated over
  ``dp_replicate``.

Fault behaviour: every collective waits at most ``timeout`` (default :data:`DEFAULT_TIMEOUT`). A rank whose peer
died usually fails at once (gloo sees the connection close); a rank whose peer hangs fails after ``timeout``; the
collectives this package issues itself raise :class:`~switchformer.parallel.CollectiveError`. Keep the timeout
above the longest legitimate wait between collectives, such as a checkpoint write.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import logging
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from switchformer.config import Config, ConfigError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MESH_DIMS = ("dp_replicate", "dp_shard", "ep")


class Backend(enum.Enum):
    AUTO = "auto"  # nccl when CUDA is available, else gloo
    GLOO = "gloo"  # CPU tensors
    NCCL = "nccl"  # CUDA tensors
    FAKE = "fake"  # torch's fake process group: plans a layout in one process, no communication


@dataclasses.dataclass
class ParallelDims(Config):
    """How the world is split: ``world = dp_replicate * dp_shard * expert_parallel``; one of them may be -1
    (whatever the world size leaves)."""

    dp_replicate: int = 1  # full replicas of the sharded model (HSDP across nodes)
    dp_shard: int = -1  # FSDP shard degree of the experts; dense weights are sharded over dp_shard * ep
    expert_parallel: int = 1  # ranks splitting each Switch layer's experts between them

    def validate(self) -> None:
        for name in ("dp_replicate", "dp_shard", "expert_parallel"):
            value = getattr(self, name)
            self.check(value == -1 or value >= 1, name, "must be >= 1, or -1 for whatever the world size leaves")
        fill = [name for name in ("dp_replicate", "dp_shard", "expert_parallel") if getattr(self, name) == -1]
        self.check(len(fill) <= 1, fill[-1] if fill else "dp_shard", f"only one of {fill} may be -1")

    def resolve(self, world_size: int) -> ParallelDims:
        """The dims with -1 filled in; raises :class:`ConfigError` when they do not multiply to ``world_size``."""
        known = {k: v for k, v in dataclasses.asdict(self).items() if v != -1}
        product = math.prod(known.values())
        sizes = ", ".join(f"{k} {v}" for k, v in known.items())
        if world_size % product:
            raise ConfigError(
                f"the layout ({sizes}) does not divide the world size {world_size}: "
                f"world = dp_replicate * dp_shard * expert_parallel; pick degrees whose product divides it"
            )
        missing = [k for k in ("dp_replicate", "dp_shard", "expert_parallel") if k not in known]
        resolved = dataclasses.replace(self, **{k: world_size // product for k in missing})
        if resolved.world_size != world_size:
            raise ConfigError(
                f"the layout ({sizes}) has {resolved.world_size} ranks but the world has {world_size}: "
                "world = dp_replicate * dp_shard * expert_parallel; pass -1 for one of them to fill the rest"
            )
        return resolved

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.expert_parallel

    def check_experts(self, num_experts: int) -> None:
        """Each expert-parallel rank holds an equal slice of every Switch layer's experts."""
        if num_experts % self.expert_parallel:
            divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
            raise ConfigError(
                f"expert_parallel={self.expert_parallel} is invalid: it must divide the layers' num_experts="
                f"{num_experts} (each rank holds an equal slice of the experts); allowed: {divisors}"
            )

    def describe(self) -> str:
        return (
            f"{self.dp_replicate} replicate x {self.dp_shard} shard x {self.expert_parallel} expert-parallel "
            f"({self.world_size} ranks)"
        )


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in the mesh, the submeshes parameters live on, and the process groups it talks over."""

    dims: ParallelDims
    mesh: DeviceMesh  # (dp_replicate, dp_shard, ep)
    dense_mesh: DeviceMesh  # (dp_replicate, dp_shard_ep): dense parameters are sharded over the second dimension
    rank: int
    local_rank: int  # rank on this node (the CUDA device index)
    device: torch.device
    timeout: datetime.timedelta = DEFAULT_TIMEOUT

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def ep_size(self) -> int:
        return self.dims.expert_parallel

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep")

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self.mesh["ep"]

    @property
    def ep_group(self) -> dist.ProcessGroup:
        """The ranks exchanging tokens by all-to-all."""
        return self.mesh.get_group("ep")

    @property
    def expert_mesh(self) -> DeviceMesh:
        """(dp_replicate, dp_shard): each expert slice is sharded over the second dimension."""
        return self.mesh["dp_replicate", "dp_shard"]

    @property
    def shard_group(self) -> dist.ProcessGroup:
        """The ``dp_shard * ep`` ranks that hold one model between them (they run every forward in lockstep)."""
        return self.dense_mesh.get_group("dp_shard_ep")

    @property
    def world_group(self) -> dist.ProcessGroup:
        return dist.group.WORLD

    @property
    def replica(self) -> int:
        """Which of the ``dp_replicate`` model replicas this rank belongs to."""
        return self.mesh.get_local_rank("dp_replicate")


def build_layout(
    dims: ParallelDims, *, device_type: str = "cpu", timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> ParallelLayout:
    """The mesh over the initialised default group (a collective: every rank calls it with the same ``dims``)."""
    dims = dims.resolve(dist.get_world_size())
    options = _group_options(timeout)
    shard = dims.dp_shard * dims.expert_parallel
    dense = init_device_mesh(
        device_type,
        (dims.dp_replicate, shard),
        mesh_dim_names=("dp_replicate", "dp_shard_ep"),
        backend_override=None if options is None else dict.fromkeys(("dp_replicate", "dp_shard_ep"), options),
    )
    # The same ranks with the shard dimension split in two: (dp_shard, ep), ep the faster-varying one.
    overrides = None if options is None else dict.fromkeys(MESH_DIMS[1:], options)
    mesh = dense._unflatten("dp_shard_ep", (dims.dp_shard, dims.expert_parallel), MESH_DIMS[1:], overrides)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device(device_type)
    layout = ParallelLayout(
        dims=dims,
        mesh=mesh,
        dense_mesh=dense,
        rank=dist.get_rank(),
        local_rank=local_rank,
        device=device,
        timeout=timeout,
    )
    logger.info("rank %d: %s on %s", layout.rank, dims.describe(), device)
    return layout


def init_parallel(
    dims: ParallelDims,
    *,
    backend: Backend = Backend.AUTO,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    command: str = "train",
) -> ParallelLayout:
    """Initialise the default process group from torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) and build the mesh. Reuses an already initialised default group; on CUDA it
    selects device ``LOCAL_RANK`` first, so NCCL binds each rank to its own GPU."""
    if not dist.is_initialized():
        missing = [name for name in _REQUIRED_ENV if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"running over several processes needs torchrun's environment; {', '.join(missing)} not set. Launch "
                f"with e.g. `torchrun --nproc-per-node 2 -m switchformer {command} ...`"
            )
        dims.resolve(int(os.environ["WORLD_SIZE"]))  # fail before connecting to anyone
        chosen = _resolve_backend(backend)
        if chosen is Backend.NCCL:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(chosen.value, init_method="env://", timeout=timeout)
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return build_layout(dims, device_type=device_type, timeout=timeout)


def _group_options(timeout: datetime.timedelta) -> Any:
    """Options giving the mesh's process groups ``timeout``: without them DeviceMesh creates each subgroup (e.g. an
    ``ep`` group smaller than the world) with torch's default timeout (30 minutes), whatever the default group's."""
    backend = dist.get_backend()
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return options
    if backend == "gloo":
        return dist.ProcessGroupGloo.Options(backend, timeout)
    return None  # the fake backend: no communication to time out


def close_parallel() -> None:
    """Destroy all process groups (call on every rank before exiting; gloo aborts a process that skips it)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _resolve_backend(backend: Backend) -> Backend:
    if backend is Backend.AUTO:
        return Backend.NCCL if torch.cuda.is_available() else Backend.GLOO
    return backend

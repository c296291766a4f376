"""Expert parallelism: each rank keeps a slice of every Switch layer's experts; tokens travel by all-to-all.

Applied from outside the model (:func:`apply_expert_parallel`): the router stays replicated and routes the rank's
own tokens with the layer's usual :func:`~switchformer.moe.assignment.route`, so routing, capacity and the
auxiliary losses are those of one process for the same groups of tokens. Only the dispatcher changes: kept
claims travel to the rank owning their expert and their results come back, each exactly once (no capacity
padding on the wire), and the combine is the local dispatcher's gate-weighted one.

Shape legend: T tokens on this rank, K choices per token, C claims (T * K), E experts in the layer, L experts on
this rank, P EP ranks, N rows sent, M rows received, R expert rows, D d_model.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from switchformer.config import ConfigError
from switchformer.moe.assignment import Routing
from switchformer.moe.config import ExpertKernel
from switchformer.moe.dispatch import DispatchState, LocalDispatcher, TokenDispatcher, arrange_rows, choose_layout
from switchformer.moe.experts import ExpertBatch, GroupedExperts
from switchformer.moe.layer import SwitchFFN
from switchformer.parallel.collectives import all_to_all_rows, exchange_counts
from switchformer.parallel.mesh import ParallelLayout

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExpertShard:
    """Which experts of a layer one rank holds: the ``ep_rank``-th of ``ep_size`` equal contiguous slices."""

    num_experts: int  # experts in the whole layer
    ep_rank: int
    ep_size: int

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def start(self) -> int:
        return self.ep_rank * self.num_local

    @property
    def stop(self) -> int:
        return self.start + self.num_local


@dataclasses.dataclass
class AllToAllState:
    """What ``combine`` needs to send results back and undo ``dispatch``."""

    row_of_claim: torch.Tensor  # [T, K] row of each claim's result among the rows that come back; N if not sent
    row_of_received: torch.Tensor  # [M] expert row that holds each received token
    send_splits: list[int]  # [P] rows sent to each EP rank
    recv_splits: list[int]  # [P] rows received from each EP rank


class AllToAllDispatcher(TokenDispatcher):
    """The :class:`~switchformer.moe.dispatch.LocalDispatcher` interface across an expert-parallel group.

    ``dispatch`` sends each kept claim's hidden state to the rank holding its expert (claims sorted by expert,
    so by destination) and arranges what arrives into rows for the local experts; ``combine`` returns the
    results and weights them with the gate. Both all-to-alls carry gradients. Every rank of the group takes part
    in every exchange, also when it sends or receives nothing (zero-row tensors), so skewed routing cannot hang.
    Costs one host synchronisation per dispatch: the split sizes must be known on the host. The backward runs
    the same exchanges reversed, in the same order on every rank: each Switch layer sits on the residual path,
    so autograd must finish a layer's backward before it reaches the layer below.
    """

    def __init__(
        self, shard: ExpertShard, *, group: dist.ProcessGroup | None, kernel: ExpertKernel = ExpertKernel.AUTO
    ) -> None:
        self.shard = shard
        self.group = group
        self.kernel = kernel
        self._local = LocalDispatcher(shard.num_local, kernel)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[ExpertBatch, AllToAllState]:
        num_tokens, k = routing.expert_index.shape
        num_experts, num_local, ep_size = self.shard.num_experts, self.shard.num_local, self.shard.ep_size
        device = x_TD.device
        keep_C = routing.keep.reshape(-1)
        expert_C = routing.expert_index.reshape(-1)

        # Kept claims in expert order (hence destination-rank order), claim order within an expert.
        order_C = torch.argsort(torch.where(keep_C, expert_C, num_experts), stable=True)
        sent_E = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, expert_C, keep_C.long())
        recv_PL = exchange_counts(sent_E, self.group).view(ep_size, num_local)  # claims each source sends each expert
        send_splits, recv_splits = torch.stack([sent_E.view(ep_size, num_local).sum(1), recv_PL.sum(1)]).tolist()
        num_sent = sum(send_splits)

        x_ND = x_TD.index_select(0, torch.div(order_C[:num_sent], k, rounding_mode="floor"))
        x_MD = all_to_all_rows(x_ND, send_splits=send_splits, recv_splits=recv_splits, group=self.group)
        batch, row_M = self._expert_rows(x_MD, recv_PL)

        row_of_claim_C = torch.empty_like(order_C).scatter_(0, order_C, torch.arange(order_C.numel(), device=device))
        row_of_claim_TK = torch.where(keep_C, row_of_claim_C, num_sent).view(num_tokens, k)
        state = AllToAllState(
            row_of_claim=row_of_claim_TK, row_of_received=row_M, send_splits=send_splits, recv_splits=recv_splits
        )
        return batch, state

    def combine(self, y_RD: torch.Tensor, routing: Routing, state: AllToAllState) -> torch.Tensor:
        """Send each received token's result back to its rank, then ``sum_k gate_k * E_k(x)`` as in one process."""
        y_MD = y_RD.index_select(0, state.row_of_received)
        y_ND = all_to_all_rows(y_MD, send_splits=state.recv_splits, recv_splits=state.send_splits, group=self.group)
        return self._local.combine(y_ND, routing, DispatchState(row_of_claim=state.row_of_claim))

    def _expert_rows(self, x_MD: torch.Tensor, recv_PL: torch.Tensor) -> tuple[ExpertBatch, torch.Tensor]:
        """Arrange the received rows for the local experts; also returns the expert row of each received row.

        Rows arrive source by source, each source's rows sorted by local expert: a dropless local batch whose
        routing "groups" are the sources, so the local dispatcher's row arrangement applies as it is.
        """
        num_local, ep_size, device = self.shard.num_local, self.shard.ep_size, x_MD.device
        num_received = x_MD.shape[0]
        counts_B = recv_PL.reshape(-1)  # blocks: (source, local expert)
        block_M = torch.arange(ep_size * num_local, device=device).repeat_interleave(counts_B, output_size=num_received)
        block_start_B = torch.cumsum(counts_B, 0) - counts_B
        rows = arrange_rows(
            (block_M % num_local)[:, None],
            torch.ones(num_received, 1, dtype=torch.bool, device=device),
            torch.div(block_M, num_local, rounding_mode="floor"),
            (torch.arange(num_received, device=device) - block_start_B[block_M])[:, None],
            num_experts=num_local,
            num_groups=ep_size,
            capacity=None,
            layout=choose_layout(self.kernel, device),
        )
        row_M = rows.row_of_claim.view(-1)
        # Each expert row names its received row; padding rows read an appended zero row.
        source_R = torch.full((rows.num_rows,), num_received, dtype=torch.long, device=device)
        source_R.scatter_(0, row_M, torch.arange(num_received, device=device))
        x_ext = torch.cat([x_MD, x_MD.new_zeros(1, x_MD.shape[-1])], 0)
        rows_RD = x_ext.index_select(0, source_R)
        batch = ExpertBatch(
            rows_RD, rows.layout, capacity=rows.rows_per_expert, tokens_per_expert=rows.tokens_per_expert
        )
        return batch, row_M


def apply_expert_parallel(model: nn.Module, layout: ParallelLayout) -> nn.Module:
    """Split every :class:`SwitchFFN` of ``model`` over ``layout``'s expert-parallel ranks, in place.

    Each rank keeps experts ``[ep_rank * E / ep, (ep_rank + 1) * E / ep)`` of each layer as a DTensor sharded on
    the expert dimension over the ``ep`` mesh dimension (same names, the full ``[E, ...]`` global shape, so
    checkpoints and FSDP2 see the whole tensor), and swaps in an :class:`AllToAllDispatcher`; routers and dense
    weights are left to FSDP2. Works on a model on the meta device (nothing is allocated) and on a materialised
    one (its slice is kept). With ``ep == 1`` the model is left as it is.
    """
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, SwitchFFN)]
    if layout.ep_size == 1:
        return model
    for name, layer in layers:
        try:
            layout.dims.check_experts(layer.config.moe.num_experts)
        except ConfigError as error:
            raise ConfigError(f"Switch layer {name or '<root>'!r}: {error}") from None
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            raise ValueError(f"Switch layer {name or '<root>'!r} is already expert-parallel")
    for _, layer in layers:
        shard = ExpertShard(layer.config.moe.num_experts, layout.ep_rank, layout.ep_size)
        _keep_expert_slice(layer.experts, shard, layout)
        layer.dispatcher = AllToAllDispatcher(shard, group=layout.ep_group, kernel=layer.config.moe.kernel)
    logger.info(
        "expert parallelism: %d Switch layers split %d ways; this rank (ep_rank %d) holds their local slices",
        len(layers),
        layout.ep_size,
        layout.ep_rank,
    )
    return model


def expert_shards(model: nn.Module) -> dict[str, ExpertShard]:
    """Names of the expert-parallel parameters of ``model`` (as in ``named_parameters``) and the slice each holds."""
    shards: dict[str, ExpertShard] = {}
    for name, module in model.named_modules():
        if isinstance(module, SwitchFFN) and isinstance(module.dispatcher, AllToAllDispatcher):
            prefix = f"{name}.experts." if name else "experts."
            for param_name, _ in module.experts.named_parameters():
                shards[prefix + param_name] = module.dispatcher.shard
    return shards


@torch.no_grad()
def _keep_expert_slice(experts: GroupedExperts, shard: ExpertShard, layout: ParallelLayout) -> None:
    """Replace the stacked ``[E, ...]`` weights by DTensors holding this rank's ``[L, ...]`` slice (Shard(0) over
    the ``ep`` mesh dimension); registration order is unchanged."""
    for param_name, param in list(experts.named_parameters(recurse=False)):
        local = param[shard.start : shard.stop].clone()
        distributed = DTensor.from_local(
            local, layout.ep_mesh, [Shard(0)], run_check=False, shape=param.shape, stride=param.stride()
        )
        setattr(experts, param_name, nn.Parameter(distributed, requires_grad=param.requires_grad))
    experts.num_experts = shard.num_local

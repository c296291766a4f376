"""Plan a layout before renting the machines: per-rank memory and traffic of a model on ``N`` ranks.

The model is built on the meta device and the *same* code that shards it for training (``apply_expert_parallel``,
``apply_fsdp``) runs on torch's fake process group of ``N`` ranks inside this one process: nothing is allocated
and nothing is sent. What each rank would hold is then read off its parameters' local shards. Rank 0 holds the
largest shard of every weight (FSDP2 splits a weight's first dimension in ``ceil``-sized chunks), so its figures
are the busiest rank's.

Traffic per optimizer step is counted from the shapes (bytes a rank receives):

* all-to-all: every token's hidden state goes to the rank holding its expert and comes back, forward and again
  backward (4 transfers), for each Switch layer; a share ``(ep - 1) / ep`` of them leaves the rank;
* FSDP2: each block's weights are all-gathered for its forward and again for its backward (the shard is freed in
  between), and its gradients reduce-scattered: ``(n - 1) / n`` of the unit's bytes each time for a shard group
  of ``n`` ranks; with replicas, gradient shards are all-reduced across ``dp_replicate`` (twice their bytes).

The activation figure is an estimate, not a measurement (see :func:`activation_bytes`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from switchformer.models.config import ModelConfig
from switchformer.models.factory import build_model
from switchformer.moe.layer import SwitchFFN
from switchformer.parallel.expert_parallel import apply_expert_parallel
from switchformer.parallel.fsdp import ShardingOptions, apply_fsdp
from switchformer.parallel.mesh import ParallelDims, build_layout


@dataclasses.dataclass(frozen=True)
class Workload:
    batch_size: int = 256  # sequences per optimizer step, over all ranks
    seq_len: int = 512  # encoder input (or decoder-only context) length
    optimizer: str = "adamw"  # adamw | adafactor
    compute_bytes: int = 2  # bf16 activations, all-gathered weights and all-to-all payloads


@dataclasses.dataclass
class RankPlan:
    """What the busiest rank holds and moves (bytes), and the layout it was planned for."""

    layout: dict[str, int]
    params_per_rank: int
    bytes_per_rank: int  # weights + gradients + optimizer state (float32)
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # estimate for this rank's share of the batch, no activation checkpointing
    all_to_all_bytes_per_step: int
    fsdp_bytes_per_step: int
    tokens_per_rank: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_layout(config: ModelConfig, dims: ParallelDims, world_size: int, workload: Workload) -> RankPlan:
    """Shard ``config``'s model for ``world_size`` ranks on a fake process group and measure rank 0.

    Raises :class:`~switchformer.config.ConfigError` for a layout that cannot work (it does not multiply to the
    world size, the experts do not split evenly, the batch does not split over the ranks).
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dims = dims.resolve(world_size)
    if config.moe is not None:
        dims.check_experts(config.moe.num_experts)
    if workload.batch_size % world_size:
        from switchformer.config import ConfigError

        raise ConfigError(
            f"batch_size={workload.batch_size} is invalid for {world_size} ranks: every rank trains on an equal "
            f"slice of the global batch; use a multiple of {world_size}"
        )
    if dist.is_initialized():
        raise RuntimeError("planning needs a process without a process group (it creates a fake one)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        layout = build_layout(dims)
        model = build_model(config, device="meta")
        unsharded = {name: p.numel() for name, p in model.named_parameters()}
        apply_expert_parallel(model, layout)
        apply_fsdp(model, layout, ShardingOptions(param_dtype=torch.bfloat16))
        return _measure(model, config, dims, workload, unsharded)
    finally:
        dist.destroy_process_group()


def _measure(
    model: nn.Module, config: ModelConfig, dims: ParallelDims, workload: Workload, unsharded: dict[str, int]
) -> RankPlan:
    local = {name: _local(p) for name, p in model.named_parameters()}
    params = sum(t.numel() for t in local.values())
    optimizer = sum(_optimizer_numel(t, workload.optimizer) for t in local.values())
    share = _slice(config, workload, dims.world_size)
    return RankPlan(
        layout=dataclasses.asdict(dims),
        params_per_rank=params,
        bytes_per_rank=4 * (2 * params + optimizer),
        weight_bytes=4 * params,
        gradient_bytes=4 * params,
        optimizer_bytes=4 * optimizer,
        activation_bytes=activation_bytes(config, share, workload),
        all_to_all_bytes_per_step=_all_to_all_bytes(model, config, dims, share, workload),
        fsdp_bytes_per_step=_fsdp_bytes(dims, unsharded, local, workload),
        tokens_per_rank=share.encoder_tokens + share.decoder_tokens,
    )


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _optimizer_numel(shard: torch.Tensor, optimizer: str) -> int:
    """AdamW: two moments per weight. Adafactor: a row and a column statistic per matrix (per expert for a stack
    of experts), one per element for vectors."""
    if optimizer == "adamw":
        return 2 * shard.numel()
    if shard.dim() < 2:
        return shard.numel()
    *batch, rows, cols = shard.shape
    return math.prod(batch) * (rows + cols)


@dataclasses.dataclass(frozen=True)
class _Slice:
    """One rank's share of the batch: its sequences and their encoder and decoder lengths."""

    sequences: int
    encoder_length: int  # the decoder-only model's context
    decoder_length: int  # 0 for a decoder-only model

    @property
    def encoder_tokens(self) -> int:
        return self.sequences * self.encoder_length

    @property
    def decoder_tokens(self) -> int:
        return self.sequences * self.decoder_length


def _slice(config: ModelConfig, workload: Workload, world_size: int) -> _Slice:
    """Span corruption's target length gives an encoder-decoder's decoder length (T5's formula)."""
    sequences = workload.batch_size // world_size
    if not config.is_encoder_decoder:
        return _Slice(sequences, workload.seq_len, 0)
    from switchformer.data.span_corruption import compute_input_and_target_lengths

    return _Slice(sequences, workload.seq_len, compute_input_and_target_lengths(workload.seq_len).targets_length)


def _all_to_all_bytes(
    model: nn.Module, config: ModelConfig, dims: ParallelDims, share: _Slice, workload: Workload
) -> int:
    if config.moe is None or dims.expert_parallel == 1:
        return 0
    remote = (dims.expert_parallel - 1) / dims.expert_parallel
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, SwitchFFN):
            decoder = name.startswith("decoder.") and config.is_encoder_decoder
            tokens = share.decoder_tokens if decoder else share.encoder_tokens
            total += 4 * tokens * config.moe.top_k * config.d_model * workload.compute_bytes * remote
    return int(total)


def _fsdp_bytes(
    dims: ParallelDims, unsharded: dict[str, int], local: dict[str, torch.Tensor], workload: Workload
) -> int:
    """All-gathers (forward and backward) and reduce-scatters of every weight, plus HSDP's all-reduce."""
    total = 0.0
    for name, full in unsharded.items():
        is_expert = ".experts." in name
        group = dims.dp_shard if is_expert else dims.dp_shard * dims.expert_parallel
        whole = full // dims.expert_parallel if is_expert else full  # an expert slice is what FSDP shards
        if group > 1:
            share = (group - 1) / group
            total += 2 * share * whole * workload.compute_bytes  # all-gather for forward and for backward
            total += share * whole * 4  # reduce-scatter of float32 gradients
        if dims.dp_replicate > 1:
            total += 2 * (dims.dp_replicate - 1) / dims.dp_replicate * local[name].numel() * 4
    return int(total)


def activation_bytes(config: ModelConfig, share: _Slice, workload: Workload) -> int:
    """A rough estimate of what backward keeps on a rank: per block and token, about ``16 * d_model`` values
    (norms, attention inputs and outputs, residuals) plus ``2 * d_ff`` (the FFN's hidden activation, doubled for
    gated activations) plus the attention probabilities (``heads *`` the attended length), at ``compute_bytes``
    each. Activation checkpointing keeps about one block's worth plus ``d_model`` per token and block."""
    per_token = 16 * config.d_model + 2 * config.d_ff * config.activation.input_width_multiplier
    heads = config.num_heads
    encoder = config.num_layers * share.encoder_tokens * (per_token + heads * share.encoder_length)
    attended = share.decoder_length + share.encoder_length  # self- and cross-attention
    decoder = config.decoder_layers * share.decoder_tokens * (per_token + heads * attended)
    return (encoder + decoder) * workload.compute_bytes

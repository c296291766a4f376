"""Auxiliary router losses and routing statistics, as pure functions of a :class:`Routing`.

Shape legend: T tokens, E experts, K choices per token, G routing groups.
"""

from __future__ import annotations

import dataclasses

import torch

from switchformer.routing.assignment import Routing


def load_balancing_loss(routing: Routing) -> torch.Tensor:
    """The paper's differentiable balancing loss without its coefficient: ``N * sum_i f_i * P_i`` (eq. 4-6).

    ``f_i`` is the fraction of a group's tokens whose router choice (before capacity) is expert ``i``; it is a
    count, so not differentiable. ``P_i`` is the mean router probability for expert ``i`` and carries the gradient.
    Computed per routing group and averaged over the groups that hold at least one real token (T5X/flaxformer).
    Equals 1 for perfectly uniform top-1 routing (``k`` for top-k, whose choices sum to k per token).
    """
    probs_TE, num_experts, num_groups = routing.probs, routing.num_experts, routing.num_groups
    valid_T = routing.token_mask.to(probs_TE.dtype)
    group_T = routing.group_index
    k = routing.choice.shape[1]

    tokens_G = torch.zeros(num_groups, dtype=probs_TE.dtype, device=probs_TE.device).index_add_(0, group_T, valid_T)
    segment_C = (group_T[:, None] * num_experts + routing.choice).reshape(-1)
    chosen_GE = torch.zeros(num_groups * num_experts, dtype=probs_TE.dtype, device=probs_TE.device)
    chosen_GE = chosen_GE.index_add_(0, segment_C, valid_T.repeat_interleave(k)).view(num_groups, num_experts)
    prob_sum_GE = torch.zeros(num_groups, num_experts, dtype=probs_TE.dtype, device=probs_TE.device)
    prob_sum_GE = prob_sum_GE.index_add(0, group_T, probs_TE * valid_T[:, None])

    denom_G = tokens_G.clamp(min=1.0)
    fraction_GE = chosen_GE / denom_G[:, None]
    mean_prob_GE = prob_sum_GE / denom_G[:, None]
    per_group_G = num_experts * (fraction_GE * mean_prob_GE).sum(-1)
    nonempty_G = (tokens_G > 0).to(probs_TE.dtype)
    return (per_group_G * nonempty_G).sum() / nonempty_G.sum().clamp(min=1.0)


def router_z_loss(routing: Routing) -> torch.Tensor:
    """ST-MoE router z-loss without its coefficient: mean of ``logsumexp(logits)^2`` over real tokens.

    Averaged per routing group first, then over non-empty groups, like the balancing loss: then a batch and its
    gradient-accumulation micro-batches give the same value even when padding is spread unevenly between them.
    Without padding, and with equal groups, this is the plain mean over tokens.
    """
    valid_T = routing.token_mask.to(routing.logits.dtype)
    squared_T = torch.logsumexp(routing.logits, dim=-1).square() * valid_T
    return _mean_over_groups(squared_T, valid_T, routing)


def _mean_over_groups(values_T: torch.Tensor, valid_T: torch.Tensor, routing: Routing) -> torch.Tensor:
    zeros_G = values_T.new_zeros(routing.num_groups)
    sums_G = zeros_G.index_add(0, routing.group_index, values_T)
    counts_G = zeros_G.index_add(0, routing.group_index, valid_T)
    nonempty_G = (counts_G > 0).to(values_T.dtype)
    return (sums_G / counts_G.clamp(min=1.0) * nonempty_G).sum() / nonempty_G.sum().clamp(min=1.0)


@dataclasses.dataclass
class RouterStats:
    """Detached per-layer routing statistics for logging; all are tensors, so collecting them never syncs."""

    tokens_per_expert: torch.Tensor  # [E] tokens the router chose for each expert (before capacity)
    dropped_fraction: torch.Tensor  # [] share of real-token claims that found no slot
    router_confidence: torch.Tensor  # [] mean top-1 router probability
    router_entropy: torch.Tensor  # [] mean entropy of the router distribution (nats)


@torch.no_grad()
def router_stats(routing: Routing) -> RouterStats:
    num_experts = routing.num_experts
    valid_T = routing.token_mask.float()
    k = routing.choice.shape[1]
    tokens_per_expert = torch.zeros(num_experts, device=valid_T.device).index_add_(
        0, routing.choice.reshape(-1), valid_T.repeat_interleave(k)
    )
    num_valid = valid_T.sum().clamp(min=1.0)
    kept = (routing.keep.float() * valid_T[:, None]).sum()
    probs_TE = routing.probs
    entropy_T = -(probs_TE * torch.log(probs_TE.clamp(min=1e-30))).sum(-1)
    return RouterStats(
        tokens_per_expert=tokens_per_expert,
        dropped_fraction=1.0 - kept / (num_valid * k),
        router_confidence=(probs_TE.max(-1).values * valid_T).sum() / num_valid,
        router_entropy=(entropy_T * valid_T).sum() / num_valid,
    )

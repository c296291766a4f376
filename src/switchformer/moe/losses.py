"""Auxiliary router losses and routing statistics, as pure functions of a :class:`Routing`.

Shape legend: T tokens, E experts, K choices per token, G routing groups.
"""

from __future__ import annotations

import dataclasses

import torch

from switchformer.moe.assignment import Routing
from switchformer.moe.batch_slices import GroupTotals


def load_balancing_loss(routing: Routing) -> torch.Tensor:
    """The paper's differentiable balancing loss without its coefficient: ``N * sum_i f_i * P_i`` (eq. 4-6).

    ``f_i`` is the fraction of a group's tokens whose router choice (before capacity) is expert ``i``; it is a
    count, so not differentiable. ``P_i`` is the mean router probability for expert ``i`` and carries the gradient.
    Computed per routing group and averaged over the groups that hold at least one real token (T5X/flaxformer).
    Equals 1 for perfectly uniform top-1 routing (``k`` for top-k, whose choices sum to k per token).
    """
    probs_TE, num_experts, num_groups = routing.probs, routing.num_experts, routing.num_groups
    k = routing.choice.shape[1]
    member_GT = _real_tokens_of_groups(routing, probs_TE.dtype)
    totals = routing.group_totals
    if totals is not None:  # this slice's share of a group spanning processes (see _spanning_share)
        fraction_E = totals.chosen / totals.real_tokens.clamp(min=1.0)
        prob_sum_E = (member_GT @ probs_TE).sum(0)
        return _spanning_share(num_experts * (fraction_E * prob_sum_E).sum(), totals)

    tokens_G = member_GT.sum(1)
    segment_C = (routing.group_index[:, None] * num_experts + routing.choice).reshape(-1)
    chosen_GE = torch.zeros(num_groups * num_experts, dtype=probs_TE.dtype, device=probs_TE.device)
    weight_C = routing.token_mask.to(probs_TE.dtype).repeat_interleave(k)
    chosen_GE = chosen_GE.index_add_(0, segment_C, weight_C).view(num_groups, num_experts)
    prob_sum_GE = member_GT @ probs_TE

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
    if routing.group_totals is not None:
        return _spanning_share(squared_T.sum(), routing.group_totals)
    return _mean_over_groups(squared_T, valid_T, routing)


def _spanning_share(sum_over_slice: torch.Tensor, totals: GroupTotals) -> torch.Tensor:
    """A slice's loss for a group spanning ``m`` processes' slices: its sum of the group loss's terms over the
    group's real tokens, times ``m``. The processes' losses are averaged (``parallel.data_parallel``), so the
    average over ``W`` processes is ``m / W`` times the sum of the group losses: their mean over the ``W / m``
    groups, one process's figure, value and gradient (one process leaves out groups that are all padding)."""
    real = totals.real_tokens
    return sum_over_slice / real.clamp(min=1.0) * totals.span * (real > 0).to(sum_over_slice.dtype)


def _mean_over_groups(values_T: torch.Tensor, valid_T: torch.Tensor, routing: Routing) -> torch.Tensor:
    member_GT = _real_tokens_of_groups(routing, values_T.dtype)
    sums_G, counts_G = member_GT @ values_T, member_GT.sum(1)
    nonempty_G = (counts_G > 0).to(values_T.dtype)
    return (sums_G / counts_G.clamp(min=1.0) * nonempty_G).sum() / nonempty_G.sum().clamp(min=1.0)


def _real_tokens_of_groups(routing: Routing, dtype: torch.dtype) -> torch.Tensor:
    """``[G, T]`` 0/1 matrix: token t is a real token of group g. Per-group sums are then matmuls.

    A matmul rather than ``index_add``: no scatter (deterministic on any device), and inductor's CPU code
    generation fails on a scatter-add whose index it derives from ``arange`` (``route``'s group index).
    """
    groups_G1 = torch.arange(routing.num_groups, device=routing.group_index.device)[:, None]
    return ((routing.group_index[None, :] == groups_G1) & routing.token_mask[None, :]).to(dtype)


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
    top_T1 = routing.choice[:, :1]
    top_prob_T1 = routing.probs.gather(1, top_T1)
    # Entropy without a logarithm per probability: log p_e = logit_e - logit_top + log p_top, so
    # H = -log p_top + sum_e p_e (logit_top - logit_e), a sum of non-negative terms (no cancellation).
    entropy_T = (routing.probs * (routing.logits.gather(1, top_T1) - routing.logits)).sum(-1) - top_prob_T1.log()[:, 0]
    return RouterStats(
        tokens_per_expert=tokens_per_expert,
        dropped_fraction=1.0 - kept / (num_valid * k),
        router_confidence=(top_prob_T1[:, 0] * valid_T).sum() / num_valid,
        router_entropy=(entropy_T * valid_T).sum() / num_valid,
    )

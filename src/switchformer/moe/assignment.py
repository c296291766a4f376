"""Token-to-expert assignment: top-k choice, expert capacity over groups, priority and overflow.

Shape legend: T tokens (the flattened batch), E experts, K choices per token, G routing groups,
C claims (T * K), S segments (one per group and expert, plus one sentinel per group for padding tokens).

Everything here is vectorised with static shapes (no ``.item()``, no Python loop over tokens or experts), so it
runs under ``torch.compile`` and on CUDA without host synchronisation. The one exception is the optional
"no token left behind" policy, which loops over re-routing rounds until every token found room.
"""

from __future__ import annotations

import dataclasses

import torch

from switchformer.moe.batch_slices import BatchSlice, GroupTotals, current_slice, group_span
from switchformer.moe.config import Gate, Grouping, MoEConfig, OverflowPolicy, RoutingPriority


@dataclasses.dataclass
class Routing:
    """The routing decisions of one Switch layer for one batch (flaxformer's dispatch record, as indices)."""

    logits: torch.Tensor  # [T, E] float32 router logits
    probs: torch.Tensor  # [T, E] float32 softmax(logits)
    choice: torch.Tensor  # [T, K] int64 the router's top-k experts, before capacity (used by the balancing loss)
    expert_index: torch.Tensor  # [T, K] int64 expert that serves each claim (differs from choice after re-routing)
    gate: torch.Tensor  # [T, K] float32 combine weight p_i(x) (renormalised when k > 1; 1 in value if straight-through)
    keep: torch.Tensor  # [T, K] bool: the claim got a slot (False when dropped or the token is padding)
    position: torch.Tensor  # [T, K] int64 slot of the claim among its (group, expert) claims; valid where keep
    group_index: torch.Tensor  # [T] int64 routing group of each token
    token_mask: torch.Tensor  # [T] bool, False for padding tokens (they claim no slot and count in no loss)
    num_groups: int
    capacity: int | None  # slots per expert and group (the largest group's); None in dropless mode
    group_totals: GroupTotals | None = None  # a group spanning several processes' slices (moe.batch_slices)

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]


def group_sizes(num_tokens: int, group_size: int) -> list[int]:
    """Sizes of the routing groups that split ``num_tokens`` in order; the last one holds the remainder."""
    size = max(min(group_size, num_tokens), 1)
    full, rest = divmod(num_tokens, size)
    return [size] * full + ([rest] if rest else [])


def expert_capacity(tokens_in_group: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """``max(min_capacity, round(capacity_factor * tokens_in_group / num_experts))`` (paper eq. 3, flaxformer)."""
    return max(min_capacity, round(capacity_factor * tokens_in_group / num_experts))


def claim_positions(
    segment_C: torch.Tensor, priority_C: torch.Tensor, num_segments: int, base_S: torch.Tensor | None = None
) -> torch.Tensor:
    """Rank of each claim among the claims of its segment, in increasing ``priority`` (0 = first to claim).

    ``priority_C`` must be unique within a segment and lie in ``[0, num_claims)``. ``base_S`` offsets the ranks
    per segment (slots already taken). One sort and a scatter, never a [tokens, experts, capacity] tensor.
    """
    num_claims = segment_C.numel()
    # One integer key sorts by segment, then priority; priorities lie in [0, num_claims) by construction.
    order_C = torch.argsort(segment_C * max(num_claims, 1) + priority_C)
    counts_S = torch.zeros(num_segments, dtype=torch.long, device=segment_C.device)
    counts_S.scatter_add_(0, segment_C, torch.ones_like(segment_C))
    starts_S = torch.cumsum(counts_S, 0) - counts_S
    ranks_sorted_C = torch.arange(num_claims, device=segment_C.device) - starts_S[segment_C[order_C]]
    position_C = torch.empty_like(ranks_sorted_C).scatter_(0, order_C, ranks_sorted_C)
    if base_S is not None:
        position_C = position_C + base_S[segment_C]
    return position_C


def route(
    logits_TE: torch.Tensor,
    config: MoEConfig,
    *,
    training: bool,
    token_mask_T: torch.Tensor | None = None,
    sequence_length: int | None = None,
) -> Routing:
    """Assign every token to ``top_k`` experts and give each claim a slot or drop it.

    Tokens are split, in flattened-batch order, into groups (``config.grouping``: slices of ``group_size`` tokens,
    one per sequence of ``sequence_length`` tokens, or the whole batch); capacity is applied within each group.
    Claims take slots in priority order: all first choices before any second choice (GShard/flaxformer), and
    within a choice rank either by position in the batch or, with batch-prioritised routing, by router confidence.
    A claim beyond its expert's capacity is dropped (or, with ``overflow='next-best'``, re-routed).
    """
    num_tokens, num_experts = logits_TE.shape
    device = logits_TE.device
    k = config.top_k
    if token_mask_T is None:
        token_mask_T = torch.ones(num_tokens, dtype=torch.bool, device=device)
    token_mask_T = token_mask_T.reshape(num_tokens).to(device=device, dtype=torch.bool)

    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    # max returns the first of tied maxima (as the reference does) and is cheaper than topk for k = 1.
    top_probs_TK, choice_TK = probs_TE.max(-1, keepdim=True) if k == 1 else torch.topk(probs_TE, k, dim=-1)
    # Top-1 keeps p_i(x) so the router learns through the gate; top-k renormalises over the chosen experts.
    gate_TK = top_probs_TK if k == 1 else top_probs_TK / top_probs_TK.sum(-1, keepdim=True)

    if config.grouping is Grouping.SEQUENCE:
        if sequence_length is None:
            raise ValueError("grouping='sequence' needs the sequence length (SwitchFFN passes it)")
        sizes = group_sizes(num_tokens, sequence_length)
    elif config.grouping is Grouping.BATCH:
        sizes = group_sizes(num_tokens, num_tokens)
    else:
        sizes = group_sizes(num_tokens, config.group_size)
    num_groups = len(sizes)
    group_T = torch.arange(num_tokens, device=device) // sizes[0]

    # A slice of a batch spread over processes (moe.batch_slices): groups may span several slices.
    batch_slice, span = current_slice(), 1
    if batch_slice is not None and config.grouping is not Grouping.SEQUENCE and num_tokens > 0:
        size = num_tokens * batch_slice.count if config.grouping is Grouping.BATCH else config.group_size
        unsupported = None
        if not config.dropless and config.priority is not RoutingPriority.POSITION:
            unsupported = f"priority={config.priority.value!r}"
        elif not config.dropless and config.overflow is not OverflowPolicy.DROP:
            unsupported = f"overflow={config.overflow.value!r}"
        span = group_span(num_tokens, size, batch_slice, unsupported=unsupported)
    if span > 1:
        sizes = [num_tokens * span]  # the whole group's tokens, which its capacity follows

    if config.dropless:
        capacity, capacity_G = None, None
    else:
        if config.expert_capacity is not None:
            caps = [config.expert_capacity] * num_groups
        else:
            factor = config.capacity_factor_for(training)
            caps = [expert_capacity(n, num_experts, factor, config.min_capacity) for n in sizes]
        capacity = max(caps)
        capacity_G = torch.tensor(caps, dtype=torch.long, device=device)

    totals = None
    one_token_groups = max(sizes) == 1 and span == 1 and (capacity_G is None or min(caps) >= 1)
    if one_token_groups:
        # One token a group (a decoding step, routed per sequence): each of its claims is the first of its (group,
        # expert) segment, so each takes slot 0 and none is dropped (kept below); no ranking needed.
        position_TK = torch.zeros_like(choice_TK)
    else:
        # Priority of claim (token t, choice j): first choices before second ones, then the token's rank.
        if config.priority is RoutingPriority.CONFIDENCE:
            order_T = torch.argsort(top_probs_TK[:, 0], descending=True, stable=True)
            rank_T = torch.empty_like(order_T).scatter_(0, order_T, torch.arange(num_tokens, device=device))
        else:
            rank_T = torch.arange(num_tokens, device=device)
        choice_offset_K = torch.arange(k, device=device) * num_tokens
        priority_TK = rank_T[:, None] + choice_offset_K[None, :]

        # Segments: (group, expert); padding tokens go to a per-group sentinel expert E that has no slots.
        experts_per_group = num_experts + 1
        num_segments = num_groups * experts_per_group
        claim_expert_TK = torch.where(token_mask_T[:, None], choice_TK, num_experts)
        segment_TK = group_T[:, None] * experts_per_group + claim_expert_TK
        position_TK = claim_positions(segment_TK.reshape(-1), priority_TK.reshape(-1), num_segments).view(num_tokens, k)

        if span > 1:
            assert batch_slice is not None
            slots_before_TK, totals = _earlier_slices_claims(choice_TK, token_mask_T, num_experts, batch_slice, span)
    if capacity_G is None or one_token_groups:
        keep_TK = token_mask_T[:, None].expand(num_tokens, k).clone()
    elif totals is not None:  # slots the group's other slices take first; kept claims stay a prefix of each expert's
        keep_TK = token_mask_T[:, None] & (position_TK + slots_before_TK < capacity_G[group_T][:, None])
    else:
        keep_TK = token_mask_T[:, None] & (position_TK < capacity_G[group_T][:, None])

    expert_index_TK = choice_TK
    if config.overflow is OverflowPolicy.NEXT_BEST and capacity_G is not None:
        if not one_token_groups:  # (with one token a group nothing overflows)
            expert_index_TK, position_TK, keep_TK = _reroute_overflow(
                probs_TE,
                expert_index_TK,
                position_TK,
                keep_TK,
                token_mask_T,
                group_T,
                priority_TK,
                capacity_G,
                experts_per_group,
                num_segments,
            )
        gate_TK = probs_TE.gather(1, expert_index_TK)
    if config.gate is Gate.STRAIGHT_THROUGH:
        # Value 1, gradient of p_i(x): at init p_i(x) ~ 1/E would shrink the layer's output (and the experts'
        # effective step size) E-fold until the router grows confident, which small budgets never amortise.
        gate_TK = gate_TK + (1.0 - gate_TK.detach())

    return Routing(
        logits=logits_TE,
        probs=probs_TE,
        choice=choice_TK,
        expert_index=expert_index_TK,
        gate=gate_TK,
        keep=keep_TK,
        position=position_TK,
        group_index=group_T,
        token_mask=token_mask_T,
        num_groups=num_groups,
        capacity=capacity,
        group_totals=totals,
    )


def _earlier_slices_claims(
    choice_TK: torch.Tensor, token_mask_T: torch.Tensor, num_experts: int, batch_slice: BatchSlice, span: int
) -> tuple[torch.Tensor, GroupTotals]:
    """For a group spanning ``span`` slices: the slots of each claim's expert that the group takes before this
    slice's claims of the same choice rank (one process orders all first choices of the group, slice by slice,
    before any second choice), and the group's totals for the losses. One small gather per layer."""
    k = choice_TK.shape[1]
    real_TK = token_mask_T[:, None].expand_as(choice_TK).long()
    counts_KE = torch.zeros(k, num_experts, dtype=torch.long, device=choice_TK.device)
    counts_KE.scatter_add_(1, choice_TK.T.contiguous(), real_TK.T.contiguous())
    mine = torch.cat([counts_KE.reshape(-1), token_mask_T.sum().view(1)])
    gathered = batch_slice.gather(mine, span)  # [span, K * E + 1]
    slices_KE = gathered[:, :-1].view(span, k, num_experts)
    position = batch_slice.index % span
    group_KE = slices_KE.sum(0)
    # Choice rank j waits for the group's claims of ranks < j (all slices) and rank j (earlier slices); the
    # local positions already count this slice's claims of ranks < j.
    lower_KE = torch.cumsum(group_KE, 0) - group_KE - (torch.cumsum(counts_KE, 0) - counts_KE)
    before_KE = lower_KE + slices_KE[:position].sum(0)
    slots_before_TK = before_KE.gather(1, choice_TK.T.contiguous()).T
    totals = GroupTotals(span=span, chosen=group_KE.sum(0).float(), real_tokens=gathered[:, -1].sum().float())
    return slots_before_TK, totals


def _reroute_overflow(
    probs_TE: torch.Tensor,
    expert_TK: torch.Tensor,
    position_TK: torch.Tensor,
    keep_TK: torch.Tensor,
    token_mask_T: torch.Tensor,
    group_T: torch.Tensor,
    priority_TK: torch.Tensor,
    capacity_G: torch.Tensor,
    experts_per_group: int,
    num_segments: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paper appendix "no token left behind": send each dropped token to its next-best expert with room.

    Round r offers every still-dropped token its (r+1)-th ranked expert; the tokens claim the slots left over, in
    the same priority order as the first pass. Stops once no token is dropped or every expert was tried.
    """
    num_experts = experts_per_group - 1
    expert_T, position_T, keep_T = expert_TK[:, 0].clone(), position_TK[:, 0].clone(), keep_TK[:, 0].clone()
    ranked_TE = torch.argsort(probs_TE, dim=-1, descending=True)
    segment_T = group_T * experts_per_group + expert_T
    used_S = torch.zeros(num_segments, dtype=torch.long, device=probs_TE.device)
    used_S.scatter_add_(0, segment_T, keep_T.long())
    for rank in range(1, num_experts):
        dropped_T = token_mask_T & ~keep_T
        if not bool(dropped_T.any()):
            break
        candidate_T = torch.where(dropped_T, ranked_TE[:, rank], num_experts)
        segment_T = group_T * experts_per_group + candidate_T
        offered_T = claim_positions(segment_T, priority_TK[:, 0], num_segments, base_S=used_S)
        fits_T = dropped_T & (offered_T < capacity_G[group_T])
        expert_T = torch.where(fits_T, candidate_T, expert_T)
        position_T = torch.where(fits_T, offered_T, position_T)
        keep_T = keep_T | fits_T
        used_S.scatter_add_(0, segment_T, fits_T.long())
    return expert_T[:, None], position_T[:, None], keep_T[:, None]

"""A slow, obviously-correct Switch/MoE layer: Python loops over groups, claims and tokens.

It shares no code with the library's routing or dispatch; the fast path is checked against it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class ReferenceResult:
    output: torch.Tensor  # [T, D]
    expert: list[list[int]]  # per token, the expert serving each of its k claims (-1 when dropped)
    gates: list[list[float]]


def _activation(h: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return F.relu(h)
    if name == "gelu":
        return F.gelu(h)
    gate, linear = h.chunk(2, dim=-1)
    if name == "gated-gelu":
        return F.gelu(gate, approximate="tanh") * linear
    return F.silu(gate) * linear


def reference_moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    wi: torch.Tensor,
    wo: torch.Tensor,
    *,
    activation: str = "relu",
    top_k: int = 1,
    group_sizes: list[int],
    capacity: list[int] | None,
    by_confidence: bool = False,
    next_best: bool = False,
    token_mask: list[bool] | None = None,
) -> ReferenceResult:
    """``x`` is ``[T, D]``; ``capacity`` per group (None = dropless). Differentiable w.r.t. all tensors."""
    num_tokens = x.shape[0]
    num_experts = router_weight.shape[0]
    mask = token_mask if token_mask is not None else [True] * num_tokens
    probs = torch.softmax(x.float() @ router_weight.float().t(), dim=-1)
    plain = probs.detach()  # for ordering decisions only
    expert = [[-1] * top_k for _ in range(num_tokens)]
    gates: list[list[torch.Tensor]] = [[probs.new_zeros(())] * top_k for _ in range(num_tokens)]

    start = 0
    for g, size in enumerate(group_sizes):
        tokens = list(range(start, start + size))
        start += size
        used = [0] * num_experts
        cap = None if capacity is None else capacity[g]
        if by_confidence:
            tokens = sorted(tokens, key=lambda t: (-float(plain[t].max()), t))
        ranked = {t: sorted(range(num_experts), key=lambda e: (-float(plain[t, e]), e)) for t in tokens}
        for choice in range(top_k):
            for t in tokens:
                if not mask[t]:
                    continue
                e = ranked[t][choice]
                if cap is None or used[e] < cap:
                    used[e] += 1
                    expert[t][choice] = e
        if next_best and cap is not None:
            for rank in range(1, num_experts):
                for t in tokens:
                    if mask[t] and expert[t][0] == -1:
                        e = ranked[t][rank]
                        if used[e] < cap:
                            used[e] += 1
                            expert[t][0] = e
        for t in tokens:
            chosen = [ranked[t][c] for c in range(top_k)]
            total = sum(probs[t, e] for e in chosen)
            for c in range(top_k):
                if expert[t][c] == -1:
                    continue
                p = probs[t, expert[t][c]]
                gates[t][c] = p if top_k == 1 else p / total

    rows = []
    for t in range(num_tokens):
        y = x.new_zeros(x.shape[1])
        for c in range(top_k):
            e = expert[t][c]
            if e >= 0:
                h = _activation(x[t] @ wi[e], activation)
                y = y + gates[t][c].to(x.dtype) * (h @ wo[e])
        rows.append(y)
    return ReferenceResult(torch.stack(rows), expert, [[float(g.detach()) for g in gs] for gs in gates])

"""Cross-entropy of a vocabulary projection, a block of rows at a time, never as a whole [tokens, vocab] tensor.

Unfused, the output layer holds the logits, their float32 copy and their gradient: three [tokens, vocab] float32
tensors, 1.5 GB for 4096 tokens on T5's 32k vocabulary. Here each block of rows is projected, turned into its
loss and its gradient (softmax minus one-hot), and the gradient is multiplied straight into the hidden states'
and the weight's gradients, so backward has nothing left to do but scale them and no block outlives its turn.
The same idea as Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy, in plain PyTorch: no
kernel, so it runs on every device and under bf16 autocast (the matmuls autocast; the softmax is float32).
It saves memory at about the same speed (measured by ``bench/bench_output_layer.py``, figures in
docs/performance.md). On a small vocabulary (the comparison's 4096) one block is the whole batch, which is the
unfused computation.

The price is that the gradient is computed in the forward pass, so use it where the loss will be differentiated
(training) or under ``torch.no_grad`` (evaluation: then only the loss is computed).
"""

from __future__ import annotations

import torch

# Logits in one block: 128 MiB of float32. Smaller blocks save little more memory and cost speed
# (``bench/bench_output_layer.py --chunks`` compares block sizes).
_CHUNK_ELEMENTS = 2**25


def chunk_rows(vocab_size: int) -> int:
    """How many rows one block projects: about ``_CHUNK_ELEMENTS`` logits (at least one row)."""
    return max(1, _CHUNK_ELEMENTS // vocab_size)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: the softmax never runs in bf16."""
    return torch.promote_types(dtype, torch.float32)


def linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_N: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum over rows with ``labels != ignore_index`` of the cross-entropy of ``hidden @ weight.T`` (float32).

    Equal to ``F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum", ignore_index=...)``
    and to its gradients, up to float rounding, without materialising the logits.
    """
    if hidden_ND.dim() != 2 or weight_VD.dim() != 2 or hidden_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(
            f"need hidden [N, D] and weight [V, D]; got {tuple(hidden_ND.shape)}, {tuple(weight_VD.shape)}"
        )
    if labels_N.shape != hidden_ND.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden_ND.shape[0]}]; got {tuple(labels_N.shape)}")
    rows = chunk_size or chunk_rows(weight_VD.shape[0])
    if torch.is_grad_enabled() and (hidden_ND.requires_grad or weight_VD.requires_grad):
        return _LinearCrossEntropy.apply(hidden_ND, weight_VD, labels_N, ignore_index, rows)
    return _chunked_loss(hidden_ND, weight_VD, labels_N, ignore_index, rows, grads=None)


def _chunked_loss(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_N: torch.Tensor,
    ignore_index: int,
    rows: int,
    grads: tuple[torch.Tensor | None, torch.Tensor | None] | None,
) -> torch.Tensor:
    """The summed loss; with ``grads = (d_hidden, d_weight)`` (buffers of the loss's dtype, either may be None)
    also fills them with the loss's gradient."""
    total = torch.zeros((), dtype=_loss_dtype(hidden_ND.dtype), device=hidden_ND.device)
    for start in range(0, hidden_ND.shape[0], rows):
        hidden = hidden_ND[start : start + rows]
        labels = labels_N[start : start + rows]
        valid = labels != ignore_index
        target = torch.where(valid, labels, 0)[:, None]
        logits = hidden @ weight_VD.t()  # autocast (if on) picks the matmul dtype
        logits = logits.to(_loss_dtype(logits.dtype))
        lse = torch.logsumexp(logits, dim=-1)
        total += torch.where(valid, lse - logits.gather(1, target)[:, 0], 0.0).sum()
        if grads is None:
            continue
        # d(sum of losses)/d(logits) = softmax - one-hot, zero on ignored rows; reuse the logits' memory.
        probs = logits.sub_(lse[:, None]).exp_()
        probs.scatter_add_(1, target, torch.full_like(lse, -1.0)[:, None])
        probs.masked_fill_(~valid[:, None], 0.0)
        d_hidden, d_weight = grads
        if d_hidden is not None:
            d_hidden[start : start + rows] = probs.to(weight_VD.dtype) @ weight_VD
        if d_weight is not None:
            d_weight += probs.t().to(hidden.dtype) @ hidden
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, labels_N, ignore_index, rows):  # type: ignore[override]
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        buffer = {"dtype": _loss_dtype(hidden_ND.dtype), "device": hidden_ND.device}
        d_hidden = torch.empty(hidden_ND.shape, **buffer) if need_hidden else None
        d_weight = torch.zeros(weight_VD.shape, **buffer) if need_weight else None
        total = _chunked_loss(hidden_ND, weight_VD, labels_N, ignore_index, rows, grads=(d_hidden, d_weight))
        ctx.save_for_backward(
            d_hidden.to(hidden_ND.dtype) if need_hidden else None, d_weight.to(weight_VD.dtype) if need_weight else None
        )
        return total

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        d_hidden, d_weight = ctx.saved_tensors
        return (
            d_hidden * grad_total.to(d_hidden.dtype) if d_hidden is not None else None,
            d_weight * grad_total.to(d_weight.dtype) if d_weight is not None else None,
            None,
            None,
            None,
        )

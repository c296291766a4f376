"""Validation loss and perplexity of a model over a list of batches."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


def model_forward(
    model: torch.nn.Module,
    batch: Batch,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    *,
    return_logits: bool = True,
):
    """The one way the trainer and evaluation call a model on a batch (under bf16 autocast when asked).

    Without ``return_logits`` the loss comes from the chunked output layer (``linear_cross_entropy``): the same
    loss and gradients up to rounding, and no [B, S, V] logits in memory.
    """
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch["labels"],
            return_logits=return_logits,
        )


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module, batches: list[Batch], *, device: torch.device, amp_dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Mean cross-entropy over all label tokens (not a mean of batch means) and its perplexity, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        out = model_forward(model, batch, device, amp_dtype, return_logits=False)  # the loss only: bounded memory
        total += float(out.ce_loss) * int(out.num_label_tokens)
        count += int(out.num_label_tokens)
    model.train(was_training)
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_tokens": count}


def evaluate_over_ranks(
    model: torch.nn.Module,
    batches: list[Batch],
    strategy: Any,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """:func:`evaluate_model` with every rank scoring its slice of each batch and the sums added over ranks.

    A batch that does not split evenly is scored whole by every rank (identical results), so all ranks still run
    the same forward passes and collectives (sharded weights are gathered in every forward).
    """
    total, count = 0.0, 0
    for batch in batches:
        rows = next(iter(batch.values())).shape[0]
        sliced = rows % strategy.world_size == 0
        local = strategy.local_batch(batch) if sliced else batch
        with strategy.batch_slicing() if sliced else contextlib.nullcontext():
            part = evaluate_model(model, [local], device=device, amp_dtype=amp_dtype)
        scored = [part["val_loss"] * part["val_tokens"], float(part["val_tokens"])]
        if sliced:
            scored = strategy.sum(scored)
        total, count = total + scored[0], count + int(scored[1])
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_tokens": count}

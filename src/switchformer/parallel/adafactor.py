"""Adafactor over sharded parameters (DTensors), computing what one process computes.

``torch.optim.Adafactor`` takes two whole-tensor root mean squares (of the parameter, for the relative step size,
and of the update, for update clipping) and factored second moments whose column statistics average over a weight's
rows. Under FSDP2 and expert parallelism a rank holds a slice of each weight, and torch's implementation cannot run
on DTensors (it updates reduced values in place). :class:`ShardedAdafactor` runs torch's single-tensor algorithm,
in torch's order, with out-of-place operations: on plain tensors it is torch's Adafactor bit for bit, and on
DTensors every whole-tensor reduction becomes the collective DTensor chooses. Its state is torch's (per-row and
per-column statistics, as DTensors where the parameter is one), so checkpoints reshard and load in one process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate


class ShardedAdafactor(torch.optim.Adafactor):
    """``torch.optim.Adafactor`` (single-tensor algorithm) that also steps DTensor parameters."""

    checkpoint_kind = "Adafactor"  # its state is torch's: checkpoints resume with either (training.optim)

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **{**kwargs, "foreach": False})  # the single-tensor algorithm is the one mirrored

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            row_vars: list[Tensor | None] = []
            col_vars: list[Tensor | None] = []
            variances: list[Tensor | None] = []
            steps: list[Tensor] = []
            self._init_group(group, params, grads, row_vars, col_vars, variances, steps)
            for state in zip(params, grads, row_vars, col_vars, variances, steps, strict=True):
                _step_one(group, *state)
        return loss


def _step_one(
    group: dict[str, Any],
    param: Tensor,
    grad: Tensor,
    row_var: Tensor | None,
    col_var: Tensor | None,
    variance: Tensor | None,
    step_t: Tensor,
) -> None:
    """torch's ``_single_tensor_adafactor`` for one parameter, each operation in torch's order."""
    lr, d, weight_decay = float(group["lr"]), group["d"], group["weight_decay"]
    eps1, eps2 = group["eps"]
    grad = -grad if group["maximize"] else grad
    eps = torch.finfo(param.dtype).eps if eps1 is None else eps1
    step_t += 1
    step = step_t.item()
    one_minus_beta2_t = step ** group["beta2_decay"]
    rho_t = min(lr, 1 / (step**0.5))
    alpha = max(eps2, _item(param.norm(2)) / (param.numel() ** 0.5)) * rho_t
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    if grad.dim() > 1:
        assert row_var is not None and col_var is not None
        row_mean = _whole(torch.norm(grad, dim=-1, keepdim=True)).square().div(grad.size(-1))
        col_mean = _whole(torch.norm(grad, dim=-2, keepdim=True)).square().div(grad.size(-2))
        row_var.copy_(row_var.lerp(row_mean, one_minus_beta2_t))
        col_var.copy_(col_var.lerp(col_mean, one_minus_beta2_t))
        var_estimate = (row_var @ col_var).div(_whole(row_var.mean(dim=-2, keepdim=True)).clamp(min=eps))
    else:
        assert variance is not None
        variance.copy_(variance.lerp(grad * grad, one_minus_beta2_t))
        var_estimate = variance.clone()
    update = var_estimate.clamp(min=eps * eps).rsqrt() * grad
    denom = max(1.0, _item(update.norm(2)) / ((update.numel() ** 0.5) * d))
    param.add_(update, alpha=-alpha / denom)


def _whole(tensor: Tensor) -> Tensor:
    """A reduction over a sharded dimension, summed over the ranks (a DTensor's partial placements replicated)."""
    if isinstance(tensor, DTensor) and any(p.is_partial() for p in tensor.placements):
        return tensor.redistribute(placements=[Replicate() if p.is_partial() else p for p in tensor.placements])
    return tensor


def _item(tensor: Tensor) -> float:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).item()

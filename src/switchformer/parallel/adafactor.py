"""Adafactor over expert-parallel parameters, computing what one process computes.

``torch.optim.Adafactor`` scales each update by two whole-tensor root mean squares: of the parameter (the relative
step size) and of the update (update clipping). An expert-parallel rank holds only its slice of each ``[E, ...]``
expert weight, so those norms would be of the slice. :class:`ShardedAdafactor` runs torch's single-tensor
algorithm with the two squared norms of every sharded parameter summed over its expert-parallel group, so a sharded
run updates exactly as one process does. Each of the two kinds of norm travels in one all-reduce for all of a
parameter group's expert weights: two small all-reduces per parameter group and step, whatever the number of
expert weights, and none for a group without any. The factored second-moment statistics are per expert already
(their leading ``E`` dimension is a batch dimension), and the optimizer's state is torch's, so checkpoints gather
and load as torch's Adafactor checkpoints do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from switchformer.parallel.collectives import collective
from switchformer.parallel.expert_parallel import expert_shards
from switchformer.parallel.mesh import ParallelLayout


class ShardedAdafactor(torch.optim.Adafactor):
    """``torch.optim.Adafactor`` whose norms of the parameters in ``sharded`` (each one of ``group``'s equal
    slices of a whole tensor) are taken over the whole tensor."""

    checkpoint_kind = "Adafactor"  # its state is torch's: checkpoints resume with either (training.optim)

    def __init__(self, params: Any, *, sharded: list[Tensor], group: dist.ProcessGroup | None, **kwargs: Any) -> None:
        super().__init__(params, **{**kwargs, "foreach": False})  # the single-tensor algorithm is the one mirrored
        self.sharded_ids = {id(p) for p in sharded}
        self.group = group
        self.slices = dist.get_world_size(group) if sharded else 1

    def _whole_norms(self, squared: list[Tensor]) -> list[float]:
        """Norms of whole expert weights from this rank's squared norms of its slices: one all-reduce for all of
        them, whatever their number (none when there are none)."""
        if not squared:
            return []
        summed = torch.stack(squared)
        with collective("Adafactor norm all-reduce", self.group):
            dist.all_reduce(summed, group=self.group)  # every rank steps its parameters in the same order
        return summed.sqrt().tolist()

    def _param_norms(self, params: list[Tensor]) -> list[float]:
        """``param.norm(2)``, over the whole expert weight for a slice of one."""
        sharded = [p for p in params if id(p) in self.sharded_ids]
        whole = iter(self._whole_norms([p.detach().float().square().sum() for p in sharded]))
        return [next(whole) if id(p) in self.sharded_ids else p.norm(2).item() for p in params]

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
            self._step_group(group, params, grads, row_vars, col_vars, variances, steps)
        return loss

    def _step_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        row_vars: list[Tensor | None],
        col_vars: list[Tensor | None],
        variances: list[Tensor | None],
        steps: list[Tensor],
    ) -> None:
        """torch's ``_single_tensor_adafactor``, each parameter's operations in torch's order. A parameter held
        whole steps at once. An expert slice needs the norms of its whole weight and of its whole update: the
        first travel for all slices before the loop, the second after it, so a slice's update is computed once for
        its norm and again, from the same statistics (the same numbers), to be applied: one update in memory at a
        time, as in torch, rather than every slice's until the all-reduce."""
        lr, d, weight_decay = float(group["lr"]), group["d"], group["weight_decay"]
        eps1, eps2 = group["eps"]
        later: list[tuple] = []  # the slices' (param, update's inputs, alpha, numel), applied after the all-reduce
        squared: list[Tensor] = []  # their updates' squared norms on this rank
        for param, grad, row_var, col_var, variance, step_t, norm in zip(
            params, grads, row_vars, col_vars, variances, steps, self._param_norms(params), strict=True
        ):
            grad = -grad if group["maximize"] else grad
            eps = torch.finfo(param.dtype).eps if eps1 is None else eps1
            step_t += 1
            step = step_t.item()
            one_minus_beta2_t = step ** group["beta2_decay"]
            rho_t = min(lr, 1 / (step**0.5))
            sharded = id(param) in self.sharded_ids
            numel = param.numel() * (self.slices if sharded else 1)
            alpha = max(eps2, norm / (numel**0.5)) * rho_t
            if grad.dim() > 1:
                assert row_var is not None and col_var is not None
                row_var.lerp_(torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1)), one_minus_beta2_t)
                col_var.lerp_(torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2)), one_minus_beta2_t)
            else:
                assert variance is not None
                variance.lerp_(grad * grad, one_minus_beta2_t)
            inputs = (grad, row_var, col_var, variance, eps)
            update = _update(*inputs)
            if sharded:
                later.append((param, inputs, alpha, numel))
                squared.append(update.detach().float().square().sum())
            else:
                _apply(param, update, alpha, update.norm(2).item(), numel, lr, weight_decay, d)
        for (param, inputs, alpha, numel), norm in zip(later, self._whole_norms(squared), strict=True):
            _apply(param, _update(*inputs), alpha, norm, numel, lr, weight_decay, d)


def _update(
    grad: Tensor, row_var: Tensor | None, col_var: Tensor | None, variance: Tensor | None, eps: float
) -> Tensor:
    """A parameter's update from its second-moment statistics, already updated with ``grad`` (torch's steps)."""
    if grad.dim() > 1:
        assert row_var is not None and col_var is not None
        var_estimate = row_var @ col_var
        var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps))
    else:
        assert variance is not None
        var_estimate = variance.clone()
    return var_estimate.clamp_(min=eps * eps).rsqrt_().mul_(grad)


def _apply(
    param: Tensor,
    update: Tensor,
    alpha: float,
    update_norm: float,
    numel: int,
    lr: float,
    weight_decay: float,
    d: float,
) -> None:
    """Weight decay, then the update clipped by its root mean square (torch's order; neither step reads the other's
    result, so decaying after the statistics changes no number)."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    param.add_(update, alpha=-alpha / max(1.0, update_norm / ((numel**0.5) * d)))


def sharded_adafactor(
    model: nn.Module, layout: ParallelLayout, params: list[Tensor], **kwargs: Any
) -> ShardedAdafactor:
    """Adafactor over ``params`` of an expert-parallel ``model`` (see the module docstring)."""
    names = expert_shards(model)
    sharded = [p for name, p in model.named_parameters() if name in names]
    return ShardedAdafactor(params, sharded=sharded, group=layout.ep_group, **kwargs)

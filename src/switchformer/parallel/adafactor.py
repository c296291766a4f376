"""Adafactor over expert-parallel parameters, computing what one process computes.

``torch.optim.Adafactor`` scales each update by two whole-tensor root mean squares: of the parameter (the relative
step size) and of the update (update clipping). An expert-parallel rank holds only its slice of each ``[E, ...]``
expert weight, so those norms would be of the slice. :class:`ShardedAdafactor` runs torch's single-tensor
algorithm with the two squared norms of every sharded parameter summed over its expert-parallel group, so a sharded
run updates exactly as one process does. Each of the two kinds of norm travels in one all-reduce for all of a
parameter group's expert weights: two small all-reduces per parameter group and step, whatever the number of
expert weights, and none for a group without any. The factored second-moment statistics are per expert already
(their leading ``E`` dimension is a batch dimension), and the optimizer's state is torch's, so checkpoints gather
and load as before.
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

    def __init__(
        self, params: Any, *, sharded: list[Tensor], group: dist.ProcessGroup | None, **kwargs: Any
    ) -> None:  # fmt: skip
        super().__init__(params, **{**kwargs, "foreach": False})  # the single-tensor algorithm is the one mirrored
        self.sharded_ids = {id(p) for p in sharded}
        self.group = group
        self.slices = dist.get_world_size(group) if sharded else 1

    def _norms(self, params: list[Tensor], tensors: list[Tensor]) -> list[float]:
        """``tensor.norm(2)`` of each of ``tensors``, over the whole expert weight where its parameter in ``params``
        is a slice of one. The sharded ones' squared norms travel in one all-reduce: one blocking collective per
        call, whatever the number of expert weights, rather than one each."""
        sharded = [id(p) in self.sharded_ids for p in params]
        squared = [t.detach().float().square().sum() for t, s in zip(tensors, sharded, strict=True) if s]
        whole = iter([])
        if squared:
            summed = torch.stack(squared)
            with collective("Adafactor norm all-reduce", self.group):
                dist.all_reduce(summed, group=self.group)  # every rank steps its parameters in the same order
            whole = iter(summed.sqrt().tolist())
        return [next(whole) if s else t.norm(2).item() for t, s in zip(tensors, sharded, strict=True)]

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
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], row_vars: list[Tensor | None],
        col_vars: list[Tensor | None], variances: list[Tensor | None], steps: list[Tensor],
    ) -> None:  # fmt: skip
        """torch's ``_single_tensor_adafactor``, each parameter's operations in its order, split in three passes so
        that :meth:`_norms` takes each of its two norms of all parameters at once: of the parameters before weight
        decay (alpha), then of every update (clipping), which is applied only once that norm is known."""
        lr, d, weight_decay = float(group["lr"]), group["d"], group["weight_decay"]
        eps1, eps2 = group["eps"]
        numels = [p.numel() * (self.slices if id(p) in self.sharded_ids else 1) for p in params]
        param_norms = self._norms(params, params)
        alphas, updates = [], []
        for param, grad, row_var, col_var, variance, step_t, numel, norm in zip(
            params, grads, row_vars, col_vars, variances, steps, numels, param_norms, strict=True
        ):
            grad = -grad if group["maximize"] else grad
            eps = torch.finfo(param.dtype).eps if eps1 is None else eps1
            step_t += 1
            step = step_t.item()
            one_minus_beta2_t = step ** group["beta2_decay"]
            rho_t = min(lr, 1 / (step**0.5))
            alphas.append(max(eps2, norm / (numel**0.5)) * rho_t)
            if grad.dim() > 1:
                assert row_var is not None and col_var is not None
                row_var.lerp_(torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1)), one_minus_beta2_t)
                col_var.lerp_(torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2)), one_minus_beta2_t)
                var_estimate = row_var @ col_var
                var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps))
            else:
                assert variance is not None
                variance.lerp_(grad * grad, one_minus_beta2_t)
                var_estimate = variance.clone()
            updates.append(var_estimate.clamp_(min=eps * eps).rsqrt_().mul_(grad))
        update_norms = self._norms(params, updates)
        for param, update, alpha, numel, norm in zip(params, updates, alphas, numels, update_norms, strict=True):
            if weight_decay != 0:
                param.mul_(1 - lr * weight_decay)
            denom = max(1.0, norm / ((numel**0.5) * d))
            param.add_(update, alpha=-alpha / denom)


def sharded_adafactor(
    model: nn.Module, layout: ParallelLayout, params: list[Tensor], **kwargs: Any
) -> ShardedAdafactor:
    """Adafactor over ``params`` of an expert-parallel ``model`` (see the module docstring)."""
    names = expert_shards(model)
    sharded = [p for name, p in model.named_parameters() if name in names]
    return ShardedAdafactor(params, sharded=sharded, group=layout.ep_group, **kwargs)

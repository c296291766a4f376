"""Adafactor over expert-parallel parameters, computing what one process computes.

``torch.optim.Adafactor`` scales each update by two whole-tensor root mean squares: of the parameter (the relative
step size) and of the update (update clipping). An expert-parallel rank holds only its slice of each ``[E, ...]``
expert weight, so those norms would be of the slice. :class:`ShardedAdafactor` runs torch's single-tensor
algorithm with the two squared norms of every sharded parameter summed over its expert-parallel group (two small
all-reduces per expert weight and step), so a sharded run updates exactly as one process does. The factored
second-moment statistics are per expert already (their leading ``E`` dimension is a batch dimension), and the
optimizer's state is torch's, so checkpoints gather and load as before.
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

    def _norm(self, param: Tensor, tensor: Tensor) -> float:
        """``tensor.norm(2)``, over the whole expert weight when ``param`` is a slice of one."""
        if id(param) not in self.sharded_ids:
            return tensor.norm(2).item()
        squared = tensor.detach().float().square().sum()
        with collective("Adafactor norm all-reduce", self.group):
            dist.all_reduce(squared, group=self.group)  # every rank steps its parameters in the same order
        return squared.sqrt().item()

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
            for i, param in enumerate(params):
                self._update(group, param, grads[i], row_vars[i], col_vars[i], variances[i], steps[i])
        return loss

    def _update(
        self, group: dict[str, Any], param: Tensor, grad: Tensor, row_var: Tensor | None, col_var: Tensor | None,
        variance: Tensor | None, step_t: Tensor,
    ) -> None:  # fmt: skip
        """One parameter's step: torch's ``_single_tensor_adafactor``, with :meth:`_norm` for its two norms."""
        lr, d, weight_decay = float(group["lr"]), group["d"], group["weight_decay"]
        eps1, eps2 = group["eps"]
        grad = -grad if group["maximize"] else grad
        if eps1 is None:
            eps1 = torch.finfo(param.dtype).eps
        step_t += 1
        step = step_t.item()
        one_minus_beta2_t = step ** group["beta2_decay"]
        rho_t = min(lr, 1 / (step**0.5))
        full_numel = param.numel() * (self.slices if id(param) in self.sharded_ids else 1)
        alpha = max(eps2, self._norm(param, param) / (full_numel**0.5)) * rho_t
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        if grad.dim() > 1:
            assert row_var is not None and col_var is not None
            row_var.lerp_(torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1)), one_minus_beta2_t)
            col_var.lerp_(torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2)), one_minus_beta2_t)
            var_estimate = row_var @ col_var
            var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
        else:
            assert variance is not None
            variance.lerp_(grad * grad, one_minus_beta2_t)
            var_estimate = variance.clone()
        update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_()
        update.mul_(grad)
        denom = max(1.0, self._norm(param, update) / ((full_numel**0.5) * d))
        param.add_(update, alpha=-alpha / denom)


def sharded_adafactor(
    model: nn.Module, layout: ParallelLayout, params: list[Tensor], **kwargs: Any
) -> ShardedAdafactor:
    """Adafactor over ``params`` of an expert-parallel ``model`` (see the module docstring)."""
    names = expert_shards(model)
    sharded = [p for name, p in model.named_parameters() if name in names]
    return ShardedAdafactor(params, sharded=sharded, group=layout.ep_group, **kwargs)

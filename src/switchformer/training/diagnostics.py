"""Find where NaN/inf came from, so the error names a layer rather than just "loss is nan"."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name))]
    return []


def first_non_finite_module(model: torch.nn.Module, run_forward: Callable[[], Any]) -> str | None:
    """Re-run a forward pass with hooks and return the first module (in execution order) producing NaN/inf.

    Costs one extra forward, only when a fault was detected. The RNG state is restored afterwards so the run's
    randomness is unaffected.
    """
    found: list[str] = []
    handles = []

    def hook(name: str):
        def check(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if not found and any(t.is_floating_point() and not torch.isfinite(t).all() for t in _tensors(output)):
                found.append(name)

        return check

    for name, module in model.named_modules():
        if name:  # hooks fire as modules finish, so inner modules report before the blocks that contain them
            handles.append(module.register_forward_hook(hook(name)))
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():
            run_forward()
    finally:
        torch.set_rng_state(rng)
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def last_non_finite_gradient(model: torch.nn.Module) -> str | None:
    """The parameter nearest the output (last registered) whose gradient is non-finite: backward starts there."""
    name = None
    for param_name, param in model.named_parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            name = param_name
    return name

"""The machinery behind every explicit key map: how one of our tensors is built from external tensors and back.

A :class:`ParamMapping` names one of our state-dict entries, the external entries it is made of, and the
:class:`Transform` between them. The Hugging Face and T5X maps (``hf_keys.py``, ``t5x.py``) are plain lists of
these, so a reader sees every name once; this module applies a list in either direction and turns every
mismatch into a :class:`CheckpointError` naming the source, the key and the problem.

Shape legend: E experts, D d_model, F d_ff, A/B the two axes of a matrix.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Collection, Iterable, Mapping

import torch

from switchformer.errors import CheckpointError
from switchformer.models.config import ModelConfig

__all__ = ["CheckpointError", "ParamMapping", "Transform"]


class Transform(enum.Enum):
    """How the external tensors of one mapping combine into ours (``join``) and split back (``split``)."""

    COPY = "copy"  # the same tensor
    TRANSPOSE = "transpose"  # ours = external.T (Flax kernels are [in, out], torch Linear weights [out, in])
    CONCAT_ROWS = "concat-rows"  # ours [2F, D] = cat(wi_0 [F, D], wi_1 [F, D]): gate half first, then linear half
    CONCAT_KERNELS = "concat-kernels"  # ours [2F, D] = cat(wi_0 [D, F], wi_1 [D, F], dim=1).T (Flax gated dense)
    STACK_T = "stack-t"  # ours [E, A, B] = stack(expert_j [B, A] .T) (one torch Linear weight per expert)
    STACK_T_GATED = "stack-t-gated"  # ours [E, D, 2F] from [e0.wi_0, e0.wi_1, e1.wi_0, ...], each [F, D]
    CONCAT_LAST = "concat-last"  # ours [E, D, 2F] = cat(wi_0 [E, D, F], wi_1 [E, D, F], dim=-1) (Flax gated experts)


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    ours: str  # key in our state dict
    external: tuple[str, ...]  # the external keys it is made of, in the order the transform expects
    transform: Transform = Transform.COPY


def join(transform: Transform, parts: list[torch.Tensor]) -> torch.Tensor:
    """Build our tensor from the external ``parts``."""
    match transform:
        case Transform.COPY:
            return parts[0]
        case Transform.TRANSPOSE:
            return parts[0].T
        case Transform.CONCAT_ROWS:
            return torch.cat(parts, 0)
        case Transform.CONCAT_KERNELS:
            return torch.cat(parts, 1).T
        case Transform.STACK_T:
            return torch.stack([p.T for p in parts])
        case Transform.STACK_T_GATED:
            pairs = zip(parts[0::2], parts[1::2], strict=True)
            return torch.stack([torch.cat([gate.T, linear.T], -1) for gate, linear in pairs])
        case Transform.CONCAT_LAST:
            return torch.cat(parts, -1)
    raise AssertionError(transform)  # pragma: no cover


def split(transform: Transform, tensor: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Inverse of :func:`join`: the ``count`` external tensors our ``tensor`` is made of."""
    match transform:
        case Transform.COPY:
            return [tensor]
        case Transform.TRANSPOSE:
            return [tensor.T]
        case Transform.CONCAT_ROWS:
            return list(tensor.chunk(2, 0))
        case Transform.CONCAT_KERNELS:
            return list(tensor.T.chunk(2, 1))
        case Transform.STACK_T:
            return [expert.T for expert in tensor.unbind(0)]
        case Transform.STACK_T_GATED:
            return [half.T for expert in tensor.unbind(0) for half in expert.chunk(2, -1)]
        case Transform.CONCAT_LAST:
            return list(tensor.chunk(2, -1))
    raise AssertionError((transform, count))  # pragma: no cover


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Shapes of our state dict for ``config``, from a model built on the meta device (nothing allocated)."""
    from switchformer.models.factory import build_model

    with torch.device("meta"):
        model = build_model(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def _listing(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def to_external(
    state: Mapping[str, torch.Tensor], mappings: list[ParamMapping], *, source: str
) -> dict[str, torch.Tensor]:
    """Our state dict -> external names; every key of ``state`` must be covered by exactly one mapping."""
    covered = {m.ours for m in mappings}
    missing = covered - set(state)
    unknown = set(state) - covered
    if missing or unknown:
        raise CheckpointError(
            f"{source}: the key map and the model disagree: missing from the model [{_listing(missing)}], "
            f"not in the key map [{_listing(unknown)}]"
        )
    out: dict[str, torch.Tensor] = {}
    for m in mappings:
        for name, part in zip(m.external, split(m.transform, state[m.ours], len(m.external)), strict=True):
            out[name] = part.contiguous()
    return out


def check_sources(
    keys: Collection[str],
    mappings: list[ParamMapping],
    *,
    source: str,
    ignorable: Callable[[str], bool] = lambda key: False,
) -> None:
    """The external ``keys`` hold every tensor ``mappings`` name and nothing else but ``ignorable`` keys (tied
    duplicates, optimizer state), so a checkpoint for a different architecture never loads silently."""
    needed = {key for m in mappings for key in m.external}
    missing = needed - set(keys)
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} tensor(s) the config needs are missing: [{_listing(missing)}] "
            "(does config.json describe these weights?)"
        )
    unknown = {key for key in keys if key not in needed and not ignorable(key)}
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} unexpected tensor(s) for this config: [{_listing(unknown)}]")


def joined(mapping: ParamMapping, parts: list[torch.Tensor], expected: torch.Size, *, source: str) -> torch.Tensor:
    """``join`` of one mapping's parts (meta tensors give just the shape), checked against the ``expected`` shape."""
    try:
        tensor = join(mapping.transform, parts)
    except RuntimeError as error:
        raise CheckpointError(
            f"{source}: cannot combine {_listing(mapping.external, 2)} into {mapping.ours}: shapes "
            f"{[tuple(p.shape) for p in parts[:2]]} ({error})"
        ) from None
    if tensor.shape != expected:
        raise CheckpointError(
            f"{source}: shape mismatch for {mapping.external[0]} -> {mapping.ours}: the config expects "
            f"{tuple(expected)}, the checkpoint gives {tuple(tensor.shape)}"
        )
    return tensor


def to_ours(
    external: Mapping[str, torch.Tensor],
    mappings: list[ParamMapping],
    *,
    config: ModelConfig,
    source: str,
    ignorable: Callable[[str], bool] = lambda key: False,
) -> dict[str, torch.Tensor]:
    """External tensors -> our state dict, checking that nothing is missing, left over (but ``ignorable`` keys, see
    :func:`check_sources`) or of the wrong shape."""
    check_sources(external.keys(), mappings, source=source, ignorable=ignorable)
    shapes = expected_shapes(config)
    if set(shapes) != {m.ours for m in mappings}:  # a bug in a key map, never a user error
        raise AssertionError(f"key map does not cover the model: {sorted(set(shapes) ^ {m.ours for m in mappings})}")
    out: dict[str, torch.Tensor] = {}
    for m in mappings:
        out[m.ours] = joined(m, [external[key] for key in m.external], shapes[m.ours], source=source).contiguous()
    return out

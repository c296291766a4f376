"""Decoding on CPU with the decoder's weights pre-packed for oneDNN (``layers.prepacked``), applied from outside.

Inside :func:`prepacked_decoder` the decoder stack's projections and experts and the output layer multiply by packed
copies of their weights; on leaving, the model is as it was. The copies stay with the model (about the decoder's
and output layer's weight bytes) so the next call reuses them; :meth:`SwitchModelBase.train` drops them, and a
weight changed in place is packed again on its next use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from switchformer.layers.prepacked import PrepackedLinear, packed_copies_of, prepack_applies
from switchformer.models.base import SwitchModelBase
from switchformer.moe.experts import GroupedExperts
from switchformer.moe.prepacked_experts import PrepackedExperts
from switchformer.moe.router import Router


def prepack_possible(model: SwitchModelBase) -> bool:
    """Whether the decoder can run on packed weights: eval mode, no autograd, no autocast, and every decoder
    weight a plain CPU tensor oneDNN packs (float32, or bf16 where the CPU has it); not under sharding."""
    if model.training or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return False
    weights = [p for name, p in model.decoder.named_parameters() if p.dim() >= 2 and "router" not in name]
    return bool(weights) and all(prepack_applies(w) for w in weights) and prepack_applies(model.vocab_weight())


@contextlib.contextmanager
def prepacked_decoder(model: SwitchModelBase, enabled: bool = True) -> Iterator[bool]:
    """Run the block with the decoder on packed weights where :func:`prepack_possible`; yields whether it does."""
    if "output_linear" in model.__dict__:  # already inside: the weights in use stay as they are
        yield True
        return
    if not (enabled and prepack_possible(model)):
        yield False
        return
    weights = packed_copies_of(model)
    weights.prune()
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.decoder.modules()):
        if isinstance(parent, Router):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                replacement: nn.Module = PrepackedLinear(child, weights)
            elif isinstance(child, GroupedExperts):
                replacement = PrepackedExperts(child, weights)
            else:
                continue
            swapped.append((parent, name, child))
            setattr(parent, name, replacement)
    model.output_linear = weights.linear
    try:
        yield True
    finally:
        del model.output_linear
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)

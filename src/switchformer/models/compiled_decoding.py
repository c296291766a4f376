"""A decoding step compiled whole, its weights frozen into the compiled code (``GenerationConfig.compile``).

Why: a decoding step multiplies a few rows by every weight it reads, so it runs at the rate its matrix products
stream weights. Eager kernels, even on packed copies (``layers.prepacked``), read them below memory speed;
inductor's CPU GEMM template reads weights folded into the compiled code as constants near the copy rate, and
compiling the step whole fuses its small per-layer operations too (``bench/bench_generation.py --compiled``,
``docs/results/generation/``).

What that takes, applied from outside the model:

- fixed shapes: a :class:`StaticDecoderCache` (keys and values in buffers of a fixed number of positions, the step's
  position in a tensor), so one compiled step serves every step of a call, and calls of the same shapes;
- a Switch layer decides on the host how many rows each expert multiplies: it runs inside the compiled step as one
  opaque operation (a ``torch.library`` custom op), eagerly, by its experts' packed copies where those apply, so
  its routing decisions, dropped tokens and outputs are the eager layer's;
- the compiled code holds its own copy of the weights it reads: it is compiled again when one of the model's
  weights changes (in place or replaced), and dropped when the model goes back to training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from switchformer.layers.prepacked import PrepackedWeights, packed_copies_of, prepack_applies
from switchformer.moe.layer import SwitchFFN
from switchformer.moe.prepacked_experts import combined_by_packed_experts

if TYPE_CHECKING:  # the model imports this module (training mode drops the compiled step)
    from switchformer.layers.kv_cache import DecoderCache
    from switchformer.models.base import SwitchModelBase
    from switchformer.models.outputs import ModelOutput
    from switchformer.models.stack import StackOutput

logger = logging.getLogger(__name__)

# What the custom op's integer argument names; weakly held, so a layer goes with its model.
_LAYERS: weakref.WeakValueDictionary[int, OpaqueSwitchLayer] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


@torch.library.custom_op("switchformer::switch_layer", mutates_args=())
def switch_layer(x: torch.Tensor, layer: int) -> torch.Tensor:
    """The output of Switch layer ``layer`` (an :class:`OpaqueSwitchLayer`'s key) for ``x``, run eagerly."""
    return _LAYERS[layer].eager(x)


@switch_layer.register_fake
def _(x: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(x)


class OpaqueSwitchLayer(nn.Module):
    """A :class:`SwitchFFN` that a compiled graph calls as one operation (``switchformer::switch_layer``).

    Decoding only: it returns the layer's output alone, not its routing record, and routes every row as a real
    token (a decoding step's new positions are). With packed expert copies (CPU) it combines the experts' outputs
    straight from the routing record (:func:`combined_by_packed_experts`); otherwise it runs the layer.
    """

    def __init__(self, layer: SwitchFFN, packed: PrepackedWeights | None) -> None:
        super().__init__()
        self.key = next(_KEYS)
        self.layer = [layer]  # in a list: not a submodule, so neither traced nor frozen
        self.packed = packed
        _LAYERS[self.key] = self

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return switch_layer(x_BSD, self.key)

    def eager(self, x_BSD: torch.Tensor) -> torch.Tensor:
        layer = self.layer[0]
        if self.packed is None:
            return layer(x_BSD).hidden_states.clone()
        x_TD, routing = layer.route_tokens(x_BSD)
        return combined_by_packed_experts(layer.experts, self.packed, x_TD, routing).view_as(x_BSD)


def compile_possible(model: SwitchModelBase) -> str | None:
    """Why the decoding step of ``model`` cannot be compiled (None when it can)."""
    if model.training:
        return "the model is in training mode; call model.eval() first"
    if torch.is_grad_enabled():
        return "autograd is on; generate() runs under torch.no_grad()"
    if any(type(p) not in (torch.Tensor, nn.Parameter) for p in model.parameters()):
        return "the model's weights are sharded (DTensor); compile the step of an unsharded model"
    return None


@dataclasses.dataclass
class CompiledStep:
    """One model's compiled decoding step and the weights it froze (by identity, memory and version)."""

    function: Callable[..., torch.Tensor]
    layers: dict[int, OpaqueSwitchLayer]  # block index -> the opaque layer that replaces its Switch layer
    fingerprint: tuple[tuple[int, int, int], ...]

    def __call__(self, model: SwitchModelBase, ids_N1: torch.Tensor, *state: object) -> torch.Tensor:
        """Logits ``[N, V]`` (float32) of the next token, for the state :func:`decoding_forward` takes after the ids
        (mask, encoder output, a :class:`StaticDecoderCache`); writes the step's keys and values into the cache."""
        options = torch._inductor.config.patch(_inductor_options(ids_N1))
        with _opaque_switch_layers(model, self.layers), options, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)  # inductor's autotuning
            return self.function(model, ids_N1, *state)


_STEPS: weakref.WeakKeyDictionary[nn.Module, CompiledStep] = weakref.WeakKeyDictionary()


def compiled_step(model: SwitchModelBase) -> CompiledStep:
    """The compiled decoding step of ``model``, made again when a weight changed since it was compiled.

    Compiling happens on the step's first call for a set of shapes (batch rows, cache positions, encoder length).
    """
    fingerprint = _fingerprint(model)
    step = _STEPS.get(model)
    if step is None or step.fingerprint != fingerprint:
        if step is not None:
            logger.info("a weight changed since the decoding step was compiled: compiling it again")
        # A new code object per compilation: dynamo keeps compiled code with the code object, guarded on the
        # parameters' identity, not their values, so frozen copies of changed weights must not be found again.
        function = types.FunctionType(_step.__code__.replace(), _step.__globals__, "_step")
        compiled = torch.compile(function, fullgraph=True)
        step = CompiledStep(compiled, _opaque_layers_for(model), fingerprint)
        _STEPS[model] = step
    return step


def drop_compiled_step(model: nn.Module) -> None:
    """Drop the compiled step kept for ``model`` (and the weights its code holds), if any."""
    _STEPS.pop(model, None)


def decoding_forward(
    model: SwitchModelBase,
    ids_N1: torch.Tensor,
    mask: torch.Tensor | None,
    memory: StackOutput | None,
    cache: DecoderCache | None,
) -> ModelOutput:
    """One decoding forward of either model type with the cache (``memory``: the encoder's output, or None)."""
    if memory is None:
        return model(ids_N1, attention_mask=mask, cache=cache, use_cache=True)
    return model(decoder_input_ids=ids_N1, attention_mask=mask, encoder_output=memory, cache=cache, use_cache=True)


def _step(model: SwitchModelBase, ids_N1: torch.Tensor, *state: object) -> torch.Tensor:
    return decoding_forward(model, ids_N1, *state).logits[:, -1].float()  # type: ignore[arg-type]


def _inductor_options(x: torch.Tensor) -> dict[str, object]:
    """Freeze the weights into the compiled code; on CPU let inductor's own GEMM template (which streams frozen
    weights near memory speed) compete with the library's kernels."""
    options: dict[str, object] = {"freezing": True}
    if x.device.type == "cpu":
        options |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
        options |= {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}  # quietly
    return options


def _fingerprint(model: nn.Module) -> tuple[tuple[int, int, int], ...]:
    return tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())


def _opaque_layers_for(model: SwitchModelBase) -> dict[int, OpaqueSwitchLayer]:
    layers = {}
    for index, block in enumerate(model.decoder.blocks):
        if isinstance(block.ffn, SwitchFFN):
            packed = packed_copies_of(model) if prepack_applies(block.ffn.experts.wi) else None
            layers[index] = OpaqueSwitchLayer(block.ffn, packed)
    return layers


@contextlib.contextmanager
def _opaque_switch_layers(model: SwitchModelBase, layers: dict[int, OpaqueSwitchLayer]) -> Iterator[None]:
    blocks = model.decoder.blocks
    stored = {index: blocks[index].ffn for index in layers}
    for index, layer in layers.items():
        blocks[index].ffn = layer
    try:
        yield
    finally:
        for index, layer in stored.items():
            blocks[index].ffn = layer

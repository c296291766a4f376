"""Sparse upcycling (Komatsuzaki et al. 2022): a dense checkpoint becomes a Switch model that starts where it is.

Every FFN that the new config makes sparse (``sparse_every``, or the per-stack lists) becomes a Switch layer whose
experts are all exact copies of the dense FFN it replaces; its router is freshly initialised with the paper's
reduced-scale truncated normal (std ``sqrt(0.1 / d_model)``); every other weight is copied unchanged.

Since each expert equals the dense FFN, the paper's gate makes the Switch layer compute ``p_i(x) * FFN(x)``: the
dense output scaled by about ``1/E`` at first, so the upcycled model starts elsewhere than the dense one ended.
:func:`upcycling_moe` gives the routing that preserves the dense model's function: the straight-through gate
(``E_i(x)`` in value, the router still learning through ``p_i(x)`` as in the paper) and dropless routing (no
token dropped, so none loses its FFN). :func:`logit_gap` measures what remains.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from switchformer.layers.feed_forward import DenseFFN
from switchformer.layers.initialization import scaled_trunc_normal_
from switchformer.models.base import SwitchModelBase
from switchformer.models.config import ModelConfig
from switchformer.moe.config import Gate, MoEConfig
from switchformer.moe.layer import SwitchFFN

logger = logging.getLogger(__name__)

ROUTER_INIT_SCALE = 0.1  # the paper's initialisation scale (section 2.3)


def upcycling_moe(num_experts: int, **changes: Any) -> MoEConfig:
    """The routing under which an upcycled model computes what the dense model computes, before training.

    ``gate='straight-through'`` weights each expert by 1 in value, with the paper's gradient for the router;
    ``dropless=True`` drops no token. ``changes`` set any other :class:`MoEConfig` field (``gate='probability'``
    for the paper's gate, ``dropless=False`` for a capacity).
    """
    return MoEConfig(num_experts=num_experts, **({"gate": Gate.STRAIGHT_THROUGH, "dropless": True} | changes))


@dataclasses.dataclass
class LogitGap:
    """How far an upcycled model's logits are from the dense model's on the same tokens (eval mode, float32)."""

    max_abs_difference: float
    largest_logit: float  # the dense model's largest |logit|
    dropped_fraction: float  # share of token claims the Switch layers dropped

    @property
    def relative(self) -> float:
        return self.max_abs_difference / max(self.largest_logit, 1e-30)


@torch.no_grad()
def logit_gap(
    dense: SwitchModelBase, sparse: SwitchModelBase, *, seed: int = 0, batch: int = 4, length: int = 32
) -> LogitGap:
    """Run both models on the same random tokens (encoder-decoder: random decoder inputs too) and compare."""
    generator = torch.Generator().manual_seed(seed)
    vocab = dense.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    inputs: dict[str, torch.Tensor] = {}
    if dense.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (batch, length), generator=generator)
    modes = {model: model.training for model in (dense, sparse)}
    try:
        expected, got = dense.eval()(ids, **inputs), sparse.eval()(ids, **inputs)
    finally:
        for model, training in modes.items():
            model.train(training)
    dropped = [float(r.stats.dropped_fraction) for r in got.router]
    return LogitGap(
        max_abs_difference=float((got.logits.float() - expected.logits.float()).abs().max()),
        largest_logit=float(expected.logits.float().abs().max()),
        dropped_fraction=sum(dropped) / len(dropped) if dropped else 0.0,
    )


def upcycled_config(dense: ModelConfig, moe: MoEConfig, *, sparse_every: int | None = None) -> ModelConfig:
    """The Switch config of a dense one: same shapes, ``moe`` added, Switch layers every ``sparse_every`` FFNs."""
    if dense.moe is not None:
        raise ValueError(
            f"the model is already a Switch model ({dense.moe.num_experts} experts); upcycling starts from a dense "
            "checkpoint (moe=None)"
        )
    config = dense.replace(moe=moe)
    if sparse_every is not None:  # the explicit per-stack placement, if any, gives way to the one asked for
        config = config.replace(sparse_every=sparse_every, sparse_layers=None, decoder_sparse_layers=None)
    if config.num_switch_layers == 0:
        raise ValueError(
            f"sparse_every={config.sparse_every} makes no layer sparse in a model of {config.num_layers} layers; "
            "use sparse_every=1"
        )
    return config


def upcycle(
    dense: SwitchModelBase,
    *,
    moe: MoEConfig,
    sparse_every: int | None = None,
    router_init_scale: float = ROUTER_INIT_SCALE,
    seed: int = 0,
) -> SwitchModelBase:
    """A Switch model (eval mode) from a dense model (``switchformer.from_pretrained`` loads one from a folder);
    ``seed`` draws the routers.

    With ``moe=upcycling_moe(E)`` its logits equal the dense model's until training starts; with the paper's gate
    they are scaled by the routers' probabilities (see the module docstring). The dense model is not modified; the
    experts are copies, so training one leaves the others unchanged.
    """
    from switchformer.models.factory import build_model

    config = upcycled_config(dense.config, moe, sparse_every=sparse_every)
    with torch.device("meta"):
        layout = build_model(config)  # names and shapes only
    state = {name: tensor.detach().clone() for name, tensor in dense.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    upcycled = []
    for name, module in layout.named_modules():
        if not isinstance(module, SwitchFFN):
            continue
        ffn = dense.get_submodule(name)
        assert isinstance(ffn, DenseFFN), f"{name} is {type(ffn).__name__} in the dense model"
        experts = moe.num_experts
        wi_DF = state.pop(f"{name}.wi.weight").t()  # nn.Linear stores [out, in]; experts hold [in, out]
        wo_FD = state.pop(f"{name}.wo.weight").t()
        state[f"{name}.experts.wi"] = wi_DF.unsqueeze(0).repeat(experts, 1, 1)  # [E, D, M*F]: E copies
        state[f"{name}.experts.wo"] = wo_FD.unsqueeze(0).repeat(experts, 1, 1)  # [E, F, D]
        shape, dtype = module.router.weight.shape, wi_DF.dtype
        state[f"{name}.router.weight"] = _router_init(shape, router_init_scale, generator, dtype)
        if module.router.bias is not None:
            state[f"{name}.router.bias"] = torch.zeros(experts, dtype=wi_DF.dtype)
        upcycled.append(name)
    model = build_model(config, device="meta")
    model.load_state_dict(state, assign=True)  # adopts the tensors: no second copy, no random init
    model.eval()
    logger.info("upcycled %d FFNs into Switch layers of %d experts: %s", len(upcycled), moe.num_experts, upcycled)
    return model


def _router_init(shape: torch.Size, scale: float, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """The paper's truncated normal with std ``sqrt(scale / d_model)``, drawn from ``generator``."""
    weight = torch.empty(shape, dtype=torch.float32)
    scaled_trunc_normal_(weight, scale=scale, fan_in=shape[1], generator=generator)
    return weight.to(dtype)

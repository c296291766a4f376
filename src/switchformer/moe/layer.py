"""The Switch layer: a router, a token dispatcher and stacked experts in place of a Transformer FFN.

Shape legend: B batch, S sequence, T = B * S tokens, D d_model, E experts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from switchformer import host_memory
from switchformer.computed_once import computed_once
from switchformer.config import Config
from switchformer.layers.activation import Activation
from switchformer.layers.initialization import InitKind, InitRule, apply_init_rules
from switchformer.moe.assignment import Routing, route
from switchformer.moe.config import MoEConfig
from switchformer.moe.dispatch import LocalDispatcher, TokenDispatcher
from switchformer.moe.experts import GroupedExperts
from switchformer.moe.losses import RouterStats, load_balancing_loss, router_stats, router_z_loss
from switchformer.moe.router import Router


@dataclasses.dataclass
class SwitchFFNConfig(Config):
    """A standalone Switch layer: the FFN shape plus its :class:`MoEConfig`."""

    d_model: int = 512
    d_ff: int = 2048
    activation: Activation = Activation.RELU
    init_scale: float = 0.1  # the paper's reduced initialisation scale
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)

    def validate(self) -> None:
        self.check(self.d_model >= 1, "d_model", "must be >= 1")
        self.check(self.d_ff >= 1, "d_ff", "must be >= 1")
        self.check(self.init_scale > 0, "init_scale", "must be > 0 (the paper uses 0.1)")


@dataclasses.dataclass
class MoEOutput:
    """What one Switch layer returns: its output and routing record.

    The router losses and statistics are computed from the routing record when first read, then kept: a decoding
    step, which reads none of them, does not pay for them. Losses are unweighted; the model applies the
    coefficients.
    """

    hidden_states: torch.Tensor  # [B, S, D]; zero for dropped tokens (the residual carries them)
    routing: Routing  # the full routing record (expert choices, gates, slots), for inspection and tests

    @computed_once
    def load_balancing_loss(self) -> torch.Tensor:
        """[] ``N * sum_i f_i P_i``, 1.0 at uniform top-1 routing."""
        return load_balancing_loss(self.routing)

    @computed_once
    def z_loss(self) -> torch.Tensor:
        """[] mean ``logsumexp(logits)^2``."""
        return router_z_loss(self.routing)

    @computed_once
    def stats(self) -> RouterStats:
        """All detached statistics, for logging."""
        return router_stats(self.routing)

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """[E] tokens the router chose per expert, before capacity (detached)."""
        return self.stats.tokens_per_expert

    @property
    def dropped_fraction(self) -> torch.Tensor:
        """[] share of token claims that found no slot (detached)."""
        return self.stats.dropped_fraction


class SwitchFFN(nn.Module):
    """Switch Transformer feed-forward layer (Fedus et al. 2021): ``y = p_i(x) * E_i(x)`` with ``i = argmax p(x)``.

    Build it from a :class:`SwitchFFNConfig` or from keyword arguments::

        layer = SwitchFFN(d_model=512, d_ff=2048, num_experts=8, capacity_factor=1.25)
        out = layer(x)  # x: [batch, seq, d_model]; out.hidden_states, out.load_balancing_loss, ...

    Keyword arguments other than ``d_model``, ``d_ff``, ``activation`` and ``init_scale`` are
    :class:`MoEConfig` fields (``top_k``, ``eval_capacity_factor``, ``group_size``, ``dropless``, ...).

    Host synchronisation (the hot path otherwise keeps every decision on the device, and with a capacity it
    traces under ``torch.compile`` without a graph break): the grouped layout (CUDA; ``torch._grouped_mm``) takes
    the per-expert offsets on the device, and only its fallback for builds without grouped GEMM reads the counts
    (``.tolist()``). The looped layout (eager CPU code) reads the counts on the host, where no device queue has to
    drain, to size its rows and loop over the experts. The padded layout, with dropless routing (compiled CPU code,
    or ``kernel='padded-bmm'``), reads the busiest expert's count once per call to size the padding (``.item()``, a
    graph break). ``overflow='next-best'`` checks once per re-routing round for dropped tokens.

    Host memory: building the layer tells glibc to keep freed memory in the process
    (:func:`switchformer.host_memory.keep_freed_memory`), so that on CPU each step's fresh expert gradients are
    not page-faulted in again; ``SWITCHFORMER_KEEP_FREED_MEMORY=0`` in the environment leaves glibc's settings
    alone. Measured in ``bench/bench_plain_loop.py``.
    """

    def __init__(self, config: SwitchFFNConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = _config_from_kwargs(kwargs)
        elif kwargs:
            raise TypeError("pass either a SwitchFFNConfig or keyword arguments, not both")
        host_memory.apply_default()  # before the experts' weights and gradients are allocated
        self.config = config
        moe = config.moe
        self.router = Router(config.d_model, moe.num_experts, jitter=moe.router_jitter, bias=moe.router_bias)
        dropout = moe.expert_dropout if moe.expert_dropout is not None else 0.0
        self.experts = GroupedExperts(moe.num_experts, config.d_model, config.d_ff, config.activation, dropout=dropout)
        self.dispatcher: TokenDispatcher = LocalDispatcher(moe.num_experts, moe.kernel)
        self.reset_parameters()

    def init_rules(self) -> dict[str, InitRule]:
        scale = self.config.init_scale
        rules = {"router.weight": InitRule(InitKind.SCALED_TRUNC_NORMAL, scale, fan_in=self.config.d_model)}
        if self.router.bias is not None:
            rules["router.bias"] = InitRule(InitKind.ZEROS)
        experts = self.experts.init_rules(init_scale=scale)
        return rules | {f"experts.{name}": rule for name, rule in experts.items()}

    def reset_parameters(self) -> None:
        apply_init_rules(self, self.init_rules())

    def forward(self, x_BSD: torch.Tensor, token_mask: torch.Tensor | None = None) -> MoEOutput:
        """Route, run the experts and combine.

        ``token_mask`` (``[B, S]``, True for real tokens) keeps padding out of expert slots and out of the losses.
        """
        batch_shape = x_BSD.shape[:-1]
        x_TD, routing = self.route_tokens(x_BSD, token_mask)
        expert_batch, state = self.dispatcher.dispatch(x_TD, routing)
        y_RD = self.experts(expert_batch)
        y_TD = self.dispatcher.combine(y_RD, routing, state)
        return MoEOutput(hidden_states=y_TD.view(*batch_shape, -1), routing=routing)

    def route_tokens(self, x_BSD: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """The tokens as rows ``[T, D]`` and the router's decisions for them (the first half of ``forward``)."""
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        logits_TE = self.router(x_TD, rows=x_BSD.shape[0] if x_BSD.dim() >= 3 else 1)
        routing = route(
            logits_TE,
            self.config.moe,
            training=self.training,
            token_mask_T=None if token_mask is None else token_mask.reshape(-1),
            sequence_length=x_BSD.shape[-2] if x_BSD.dim() >= 3 else None,
        )
        return x_TD, routing


def _config_from_kwargs(kwargs: dict[str, Any]) -> SwitchFFNConfig:
    layer_fields = {f.name for f in dataclasses.fields(SwitchFFNConfig)} - {"moe"}
    moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
    unknown = sorted(set(kwargs) - layer_fields - moe_fields)
    if unknown:
        raise TypeError(f"SwitchFFN got unknown argument(s) {unknown}; allowed: {sorted(layer_fields | moe_fields)}")
    moe = MoEConfig(**{k: v for k, v in kwargs.items() if k in moe_fields})
    return SwitchFFNConfig(moe=moe, **{k: v for k, v in kwargs.items() if k in layer_fields})

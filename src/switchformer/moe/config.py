"""Configuration of a Switch (mixture-of-experts) feed-forward layer."""

from __future__ import annotations

import dataclasses
import enum

from switchformer.config import Config


class RoutingPriority(enum.Enum):
    """Which tokens claim an expert's slots first when it is over capacity.

    With a capacity that binds, ``CONFIDENCE`` lets a later token take the slot of an earlier one, so in a
    decoder (causal) stack an earlier position's output depends on later tokens: not causal. Building such a
    model warns once; see docs/routing-caveats.md.
    """

    POSITION = "position"  # flattened-batch order, as in the paper and Mesh-TF; causal within a sequence
    CONFIDENCE = "confidence"  # batch-prioritised routing (V-MoE): most confident first; leaks the future in decoders


class RoutingCaveatWarning(UserWarning):
    """A routing option whose outputs depend on more than they seem to (docs/routing-caveats.md)."""


class OverflowPolicy(enum.Enum):
    """What happens to a token whose chosen expert is full."""

    DROP = "drop"  # the paper: zero layer output, the residual connection carries the token
    NEXT_BEST = "next-best"  # appendix "no token left behind": re-route to the next-best expert with room


class Gate(enum.Enum):
    """How a top-1 expert's output is weighted by the router's probability ``p_i(x)``."""

    PROBABILITY = "probability"  # the paper: y = p_i(x) E_i(x), so the router learns through the product
    STRAIGHT_THROUGH = "straight-through"  # y = E_i(x) in value, with the paper's gradient for the router


class Grouping(enum.Enum):
    """Which tokens are routed together (capacity and the balancing loss are computed per group)."""

    TOKENS = "tokens"  # consecutive slices of group_size tokens of the flattened batch (Mesh-TF, flaxformer)
    SEQUENCE = "sequence"  # each sequence is a group (the Hugging Face port's semantics)
    BATCH = "batch"  # the whole flattened batch is one group


class ExpertKernel(enum.Enum):
    """How expert matmuls are executed; all give the same result, they differ in speed."""

    AUTO = "auto"  # chosen per call (see moe.dispatch.choose_layout): grouped GEMM on CUDA, a loop on CPU
    PADDED_BMM = "padded-bmm"  # tokens scattered into an [experts, capacity, d_model] buffer, then torch.bmm
    GROUPED_MM = "grouped-mm"  # tokens sorted by expert, torch._grouped_mm over ragged groups (no padding)
    LOOP = "loop"  # tokens sorted by expert, one matmul per expert holding tokens (reads the counts on the host)


@dataclasses.dataclass
class MoEConfig(Config):
    """Routing, capacity and expert settings of a Switch layer (Fedus et al. 2021, section 2).

    Two caveats of capacity-limited routing (docs/routing-caveats.md): with ``priority='confidence'`` a decoder's
    earlier positions depend on later tokens whenever the capacity binds; and since capacity is computed per
    routing group, cached decoding (one new token per group, never dropped) and a full forward over the sequence
    (which may drop tokens) can give different outputs when tokens are dropped, as in transformers. Dropless
    routing (``dropless=True``) has neither.
    """

    num_experts: int = 8
    top_k: int = 1  # 1 = Switch routing; 2 = the paper's top-2 "MoE" baseline (gates renormalised)
    # Expert capacity = factor * tokens_per_group / num_experts: tokens past it are dropped, so a full forward and
    # cached decoding (one-token groups) differ when it binds (docs/routing-caveats.md).
    capacity_factor: float = 1.25  # training
    eval_capacity_factor: float = 2.0  # used in eval mode (the released configs evaluate at 2.0)
    min_capacity: int = 4  # flaxformer's floor, so tiny groups still fit a few tokens per expert
    expert_capacity: int | None = None  # a fixed capacity per group, overriding the factors (Hugging Face port)
    dropless: bool = False  # no capacity and no drops: every expert takes all tokens routed to it
    grouping: Grouping = Grouping.TOKENS
    group_size: int = 1024  # tokens per group with grouping='tokens'; the last group holds the remainder
    priority: RoutingPriority = RoutingPriority.POSITION  # 'confidence' is not causal in decoders with a capacity
    overflow: OverflowPolicy = OverflowPolicy.DROP
    gate: Gate = Gate.PROBABILITY  # top-1 only: 'straight-through' stops the gate shrinking outputs to ~1/E early on
    router_jitter: float = 0.01  # multiplicative uniform noise on the router's copy of its input, training only
    router_bias: bool = False  # the paper's router has none; the HF port can have one
    ignore_padding_tokens: bool = True  # padding claims no expert slot and counts in no loss (HF: off by default)
    expert_dropout: float | None = None  # dropout inside experts; None = the model's dropout rate
    load_balancing_loss_coef: float = 1e-2  # alpha in equation (4)
    z_loss_coef: float = 0.0  # ST-MoE router z-loss; off for the paper's Switch presets
    kernel: ExpertKernel = ExpertKernel.AUTO

    def validate(self) -> None:
        self.check(self.num_experts >= 1, "num_experts", "must be an integer >= 1")
        self.check(
            1 <= self.top_k <= self.num_experts, "top_k", f"must be between 1 and num_experts={self.num_experts}"
        )
        self.check(self.capacity_factor > 0, "capacity_factor", "must be > 0 (1.0-1.25 for training, as in the paper)")
        self.check(self.eval_capacity_factor > 0, "eval_capacity_factor", "must be > 0 (the paper evaluates at 2.0)")
        self.check(self.min_capacity >= 0, "min_capacity", "must be >= 0")
        self.check(self.expert_capacity is None or self.expert_capacity >= 1, "expert_capacity", "must be None or >= 1")
        self.check(self.group_size >= 1, "group_size", "must be >= 1")
        self.check(0 <= self.router_jitter < 1, "router_jitter", "must be in [0, 1) (the paper uses 0.01)")
        self.check(
            self.expert_dropout is None or 0 <= self.expert_dropout < 1, "expert_dropout", "must be None or in [0, 1)"
        )
        self.check(self.load_balancing_loss_coef >= 0, "load_balancing_loss_coef", "must be >= 0 (paper: 1e-2)")
        self.check(self.z_loss_coef >= 0, "z_loss_coef", "must be >= 0 (ST-MoE: 1e-3)")
        self.check(
            self.overflow is OverflowPolicy.DROP or self.top_k == 1,
            "overflow",
            "'next-best' (no token left behind) is defined for top_k=1 only; use 'drop' with top_k > 1",
        )
        self.check(
            self.gate is Gate.PROBABILITY or self.top_k == 1,
            "gate",
            "'straight-through' is defined for top_k=1 only (top-k gates are renormalised to sum to 1 already)",
        )

    def capacity_factor_for(self, training: bool) -> float:
        return self.capacity_factor if training else self.eval_capacity_factor

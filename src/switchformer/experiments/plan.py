"""The plan of a sparse-vs-dense comparison: one shared model shape, data and budget, and the runs to train.

Every run trains the same shape on the same tokens in the same order with the same seed; only the feed-forward
layers differ. The dense baseline is FLOP-matched to the top-1 Switch runs (one expert per token has the dense
FFN's shape), so a Switch run that learns faster per step also learns faster per FLOP (paper, section 3). The
top-2 run spends about twice the expert FLOPs, which is the point of that baseline (paper, Table 1).

Defaults were chosen by measurement on 2 CPU cores (docs/results/compare-calibration/): see ``ComparePlan``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

from switchformer.config import Config
from switchformer.experiments.folder import RunKind
from switchformer.models.config import Architecture, ModelConfig
from switchformer.moe.config import Gate, MoEConfig
from switchformer.training.config import Precision, Schedule, TrainConfig

# What a plan saved before these fields existed ran with: the paper's gate, MoEConfig's 1024-token groups.
_BEFORE_THE_FIELD = {"gate": Gate.PROBABILITY.value, "group_size": 1024, "z_loss_coef": 0.0, "parallel_runs": 1}


@dataclasses.dataclass
class ComparePlan(Config):
    """Shape, data and budget shared by all runs, and which runs to train."""

    # -- model (the dense shape; Switch runs replace every other FFN with experts of this shape) ------------------
    architecture: Architecture = Architecture.DECODER_ONLY  # next-token LM: every token is a label (cheapest)
    d_model: int = 128
    d_ff: int = 512
    num_layers: int = 4
    num_heads: int = 4
    init_scale: float = 0.1  # the paper's Switch init, used for every run so only the FFNs differ
    sparse_every: int = 2  # a Switch layer replaces every N-th FFN (paper: every other; 1 = every FFN, as Switch-C)
    # -- data ---------------------------------------------------------------------------------------------------
    vocab_size: int = 4096  # a trained BPE tokenizer; a small vocabulary keeps the output layer cheap
    sequence_length: int = 128
    batch_size: int = 32  # 4096 tokens a step
    validation_batches: int = 16
    # -- optimisation (tuned on the dense baseline, then shared) ------------------------------------------------
    steps: int = 1500
    lr: float = 2e-3
    warmup_steps: int = 100
    schedule: Schedule = Schedule.INVERSE_SQRT  # no decay to a fixed end: curves compare at every step
    eval_every: int = 100
    checkpoint_every: int = 500
    threads: int = 1  # torch.set_num_threads of each run, fixed: results depend on it (float sums round per thread)
    # Runs trained at once, each in its own process with `threads` threads. On 2 cores two one-thread runs side by
    # side trained 1.19x the tokens of one two-thread run at a time (measured 2026-12-04): the default comparison
    # took 61 min instead of 75-83 (docs/results/compare-side-by-side). Every run trains beside another (the last
    # ones partly alone), so times stay comparable; 1 gives each run the machine alone (then raise `threads`).
    parallel_runs: int = 2
    device: str = "cpu"  # cpu, cuda, cuda:N or auto; every run of a comparison must use the same one
    # float32 by default: the defaults pass the acceptance checks in float32 (docs/results/compare-default). bf16
    # autocast, router in float32, runs them in 60 instead of 75 min on a CPU with bf16 instructions at the same
    # final losses, but its one run fell just short of the 1.3x check (1.29x; docs/results/compare-bf16).
    precision: Precision = Precision.FP32
    seed: int = 0  # model init, router jitter and data order of every run but the extra dense seeds
    # -- the runs ------------------------------------------------------------------------------------------------
    dense_seeds: tuple[int, ...] = (0, 1)  # dense runs; more than one estimates the run-to-run noise
    expert_counts: tuple[int, ...] = (2, 8, 32)  # Switch runs at the default capacity factor (Figure 4)
    capacity_factor: float = 1.25  # training capacity factor of the expert sweep (paper default)
    eval_capacity_factor: float = 2.0
    capacity_factors: tuple[float, ...] = (1.0, 2.0)  # extra Switch runs at these factors ...
    capacity_experts: int = 8  # ... with this many experts (Table 1's capacity-factor rows)
    top2_experts: int | None = 8  # the top-2 baseline's expert count; None = no top-2 run
    top2_capacity_factor: float = 2.0  # Table 1's MoE-Base row; both choices share the slots, as in Mesh-TF
    load_balancing_loss_coef: float = 1e-2
    # Tokens routed together (MoEConfig.group_size); capacity is a share of a group. The whole default step, as
    # flaxformer routes up to 8192 tokens. In Mesh-TF's 1024-token groups 32 experts get 40 slots each, and a small
    # group's loads swing further from their mean: Switch-32 dropped 12% of its tokens at 1024, 7% at 4096.
    group_size: int = 4096
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE; MoEConfig.z_loss_coef), not in the Switch paper
    # The Switch runs' gate (MoEConfig.gate). The paper's p_i(x) starts near 1/E and shrinks every Switch layer's
    # output (and its experts' effective step) E-fold until the router grows confident, which a budget of 1500
    # steps never recovers: 1.13x with it, see docs/results/compare-paper-gate/. Straight-through keeps the
    # paper's router gradient and FLOPs. `--set gate=probability` runs the paper's gate; top-2 renormalises.
    gate: Gate = Gate.STRAIGHT_THROUGH
    only: tuple[str, ...] = ()  # train only runs with these names (empty = all)

    def __post_init__(self) -> None:
        # Overrides such as ``expert_counts=2,8`` arrive as strings; give the tuple elements their declared type.
        self.dense_seeds = tuple(int(s) for s in self.dense_seeds)
        self.expert_counts = tuple(int(e) for e in self.expert_counts)
        self.capacity_factors = tuple(float(f) for f in self.capacity_factors)
        self.only = tuple(str(n) for n in self.only)
        super().__post_init__()

    def validate(self) -> None:
        for name in ("d_model", "d_ff", "num_layers", "num_heads", "sequence_length", "batch_size", "steps"):
            self.check(getattr(self, name) >= 1, name, "must be >= 1")
        self.check(self.d_model % self.num_heads == 0, "num_heads", f"must divide d_model={self.d_model}")
        self.check(self.vocab_size >= 512, "vocab_size", "must be >= 512 (bytes, specials and sentinels)")
        self.check(self.lr > 0, "lr", "must be > 0")
        self.check(self.eval_every >= 1, "eval_every", "must be >= 1")
        self.check(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "device",
                   "must be 'cpu', 'cuda', 'cuda:N' or 'auto'")  # fmt: skip
        self.check(self.group_size >= 1, "group_size", "must be >= 1")
        self.check(self.z_loss_coef >= 0, "z_loss_coef", "must be >= 0")
        self.check(self.threads >= 1, "threads", "must be >= 1")
        self.check(self.parallel_runs >= 1, "parallel_runs", "must be >= 1 (1 = one run at a time)")
        self.check(self.validation_batches >= 1, "validation_batches", "must be >= 1")
        self.check(len(self.dense_seeds) >= 1, "dense_seeds", "needs at least one seed: the dense run is the reference")
        self.check(self.seed in self.dense_seeds, "dense_seeds", f"must include the shared seed={self.seed}")
        self.check(all(e >= 2 for e in self.expert_counts), "expert_counts", "must all be >= 2")
        self.check(all(f > 0 for f in self.capacity_factors), "capacity_factors", "must all be > 0")
        self.check(self.capacity_experts >= 2, "capacity_experts", "must be >= 2")
        self.check(self.top2_experts is None or self.top2_experts >= 2, "top2_experts", "must be None or >= 2")

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> Self:
        """The plan of a ``compare.json``, with the values that plans saved before a field existed ran with."""
        return cls.from_dict({**_BEFORE_THE_FIELD, **saved})

    def train_config(self, seed: int) -> TrainConfig:
        """The optimiser and schedule every run shares; only ``seed`` differs for the extra dense seeds."""
        return TrainConfig(
            steps=self.steps, lr=self.lr, warmup_steps=self.warmup_steps, schedule=self.schedule,
            eval_every=self.eval_every, log_every=min(10, self.eval_every), checkpoint_every=self.checkpoint_every,
            keep_checkpoints=1, seed=seed, threads=self.threads, device=self.device, precision=self.precision,
        )  # fmt: skip

    def dense_model(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            architecture=self.architecture, vocab_size=vocab_size, d_model=self.d_model, d_ff=self.d_ff,
            num_layers=self.num_layers, num_heads=self.num_heads, dropout=0.0, init_scale=self.init_scale,
            sparse_every=self.sparse_every,
        )  # fmt: skip

    def moe(self, num_experts: int, capacity_factor: float, top_k: int = 1) -> MoEConfig:
        eval_factor = max(self.eval_capacity_factor, capacity_factor) * top_k
        return MoEConfig(
            num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor, eval_capacity_factor=eval_factor,
            load_balancing_loss_coef=self.load_balancing_loss_coef, group_size=self.group_size,
            z_loss_coef=self.z_loss_coef,
            gate=self.gate if top_k == 1 else Gate.PROBABILITY,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the comparison: its folder name, what it varies, and its full model config."""

    name: str
    kind: RunKind
    model: ModelConfig
    seed: int
    num_experts: int  # 1 for the dense model
    capacity_factor: float | None  # training capacity factor; None for the dense model

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "kind": self.kind.value, "seed": self.seed, "num_experts": self.num_experts,
            "capacity_factor": self.capacity_factor, "model": self.model.to_dict(),
        }  # fmt: skip


def dense_name(seed: int) -> str:
    return f"dense-seed{seed}"


def switch_name(num_experts: int, capacity_factor: float, default_factor: float) -> str:
    suffix = "" if capacity_factor == default_factor else f"-cf{capacity_factor:g}"
    return f"switch-{num_experts}{suffix}"


def plan_runs(plan: ComparePlan, vocab_size: int) -> list[RunSpec]:
    """All runs of ``plan`` in training order: dense (reference seed first), expert sweep, capacity factors, top-2.

    ``plan.only`` keeps the named runs; unknown names are an error listing the known ones.
    """
    dense = plan.dense_model(vocab_size)
    seeds = [plan.seed, *(s for s in plan.dense_seeds if s != plan.seed)]
    runs = [RunSpec(dense_name(s), RunKind.DENSE, dense, s, 1, None) for s in seeds]
    switch_points = [(e, plan.capacity_factor) for e in plan.expert_counts]
    switch_points += [(plan.capacity_experts, f) for f in plan.capacity_factors]
    seen: set[str] = set()
    for experts, factor in switch_points:
        name = switch_name(experts, factor, plan.capacity_factor)
        if name not in seen:
            seen.add(name)
            model = dense.replace(moe=plan.moe(experts, factor))
            runs.append(RunSpec(name, RunKind.SWITCH, model, plan.seed, experts, factor))
    if plan.top2_experts is not None:
        model = dense.replace(moe=plan.moe(plan.top2_experts, plan.top2_capacity_factor, top_k=2))
        name = f"top2-{plan.top2_experts}"
        runs.append(RunSpec(name, RunKind.TOP2, model, plan.seed, plan.top2_experts, plan.top2_capacity_factor))
    if plan.only:
        known = [r.name for r in runs]
        unknown = sorted(set(plan.only) - set(known))
        if unknown:
            raise ValueError(f"ComparePlan.only names unknown run(s) {unknown}; this plan's runs are {known}")
        runs = [r for r in runs if r.name in plan.only]
    return runs

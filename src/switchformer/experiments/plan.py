"""The plan of a sparse-vs-dense comparison: one shared model shape, data and budget, and the runs to train.

Every run trains the same shape on the same tokens in the same order with the same seed; only the feed-forward
layers differ. The dense baseline is FLOP-matched to the top-1 Switch runs (one expert per token has the dense
FFN's shape), so a Switch run that learns faster per step also learns faster per FLOP (paper, section 3). The
top-2 run spends about twice the expert FLOPs, which is the point of that baseline (paper, Table 1).

The plan is made of the library's own configs (``model``, ``train``, ``data``) and the ``sweep`` of runs. The
defaults were chosen by measurement: docs/results/compare-calibration/ and docs/experiments.md say why.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

from switchformer.config import Config, invalid
from switchformer.data import DataConfig, Objective
from switchformer.experiments.folder import RunKind
from switchformer.models.config import Architecture, ModelConfig
from switchformer.moe.config import Gate, MoEConfig
from switchformer.training.config import Precision, Schedule, TrainConfig

# The plan's fields before it had sections, each a field of a section now: ``--set`` and ``replace`` accept them,
# and ``compare.json`` files saved before the sections are read with them.
_SECTION_FIELDS = {
    "model": ("architecture", "d_model", "d_ff", "num_layers", "num_heads", "init_scale", "sparse_every"),
    "model.moe": (
        "capacity_factor",
        "eval_capacity_factor",
        "load_balancing_loss_coef",
        "group_size",
        "z_loss_coef",
        "gate",
    ),
    "data": ("vocab_size", "sequence_length", "batch_size", "validation_batches"),
    "train": (
        "steps",
        "lr",
        "warmup_steps",
        "schedule",
        "eval_every",
        "checkpoint_every",
        "threads",
        "device",
        "precision",
        "seed",
    ),
    "sweep": (
        "dense_seeds",
        "expert_counts",
        "capacity_factors",
        "capacity_experts",
        "top2_experts",
        "top2_capacity_factor",
    ),
}
SHORT_NAMES = {name: f"{section}.{name}" for section, names in _SECTION_FIELDS.items() for name in names}
# What a flat plan saved before these fields existed ran with: the paper's gate, MoEConfig's 1024-token groups.
_BEFORE_THE_FIELD = {"gate": Gate.PROBABILITY.value, "group_size": 1024, "z_loss_coef": 0.0, "parallel_runs": 1}


def _model() -> ModelConfig:
    return ModelConfig(
        architecture=Architecture.DECODER_ONLY,  # next-token LM: every token is a label (cheapest)
        d_model=128,
        d_ff=512,
        num_layers=4,
        num_heads=4,
        dropout=0.0,
        init_scale=0.1,  # the paper's Switch init, used for every run so only the FFNs differ
        sparse_every=2,  # a Switch layer replaces every N-th FFN (paper: every other; 1 = every FFN, as Switch-C)
        vocab_size=4096,  # follows data.vocab_size
        moe=_routing(),
    )


def _routing() -> MoEConfig:
    """The routing every Switch run shares; each run sets its own experts, top-k and capacity factor."""
    # The whole default step is one routing group, as flaxformer routes up to 8192 tokens: in Mesh-TF's 1024-token
    # groups a small group's loads swing further from their mean and Switch-32 drops more tokens. The gate:
    # straight-through keeps the paper's router gradient and FLOPs without shrinking every Switch layer's output
    # E-fold while the router is unsure (docs/results/compare-paper-gate/); gate=probability runs the paper's.
    return MoEConfig(capacity_factor=1.25, eval_capacity_factor=2.0, group_size=4096, gate=Gate.STRAIGHT_THROUGH)


def _train() -> TrainConfig:
    return TrainConfig(
        steps=1500,
        lr=2e-3,  # tuned on the dense baseline, then shared
        warmup_steps=100,
        schedule=Schedule.INVERSE_SQRT,  # no decay to a fixed end: curves compare at every step
        eval_every=100,
        checkpoint_every=500,
        keep_checkpoints=1,
        seed=0,  # model init, router jitter and data order of every run but the extra dense seeds
        threads=1,  # fixed: results depend on it (float sums round per thread)
        device="cpu",  # every run of a comparison must use the same one
        precision=Precision.FP32,  # bf16 is an option, not the default: docs/results/compare-bf16/
    )


def _data() -> DataConfig:
    return DataConfig(
        objective=Objective.CAUSAL_LM,  # follows model.architecture
        vocab_size=4096,  # a trained BPE tokenizer; a small vocabulary keeps the output layer cheap
        sequence_length=128,
        batch_size=32,
        validation_batches=16,
    )


@dataclasses.dataclass
class SweepConfig(Config):
    """Which runs a comparison trains beside the reference dense run (seed ``train.seed``)."""

    dense_seeds: tuple[int, ...] = (0, 1)  # dense runs; more than one estimates the run-to-run noise
    expert_counts: tuple[int, ...] = (2, 8, 32)  # Switch runs at model.moe.capacity_factor (Figure 4)
    capacity_factors: tuple[float, ...] = (1.0, 2.0)  # extra Switch runs at these factors ...
    capacity_experts: int = 8  # ... with this many experts (Table 1's capacity-factor rows)
    top2_experts: int | None = 8  # the top-2 baseline's expert count; None = no top-2 run
    top2_capacity_factor: float = 2.0  # Table 1's MoE-Base row; both choices share the slots, as in Mesh-TF

    def __post_init__(self) -> None:
        # Overrides such as ``expert_counts=2,8`` arrive as strings; give the tuple elements their declared type.
        self.dense_seeds = tuple(int(s) for s in self.dense_seeds)
        self.expert_counts = tuple(int(e) for e in self.expert_counts)
        self.capacity_factors = tuple(float(f) for f in self.capacity_factors)
        super().__post_init__()

    def validate(self) -> None:
        self.check(len(self.dense_seeds) >= 1, "dense_seeds", "needs at least one seed: the dense run is the reference")
        self.check(all(e >= 2 for e in self.expert_counts), "expert_counts", "must all be >= 2")
        self.check(all(f > 0 for f in self.capacity_factors), "capacity_factors", "must all be > 0")
        self.check(self.capacity_experts >= 2, "capacity_experts", "must be >= 2")
        self.check(self.top2_experts is None or self.top2_experts >= 2, "top2_experts", "must be None or >= 2")
        self.check(self.top2_capacity_factor > 0, "top2_capacity_factor", "must be > 0")


@dataclasses.dataclass
class ComparePlan(Config):
    """Shape, data and budget shared by all runs, and which runs to train.

    Three fields follow others: ``data.objective`` the architecture, ``data.seed`` ``train.seed``, and
    ``model.vocab_size`` ``data.vocab_size`` (each run's model then takes the trained tokenizer's size).
    """

    model: ModelConfig = dataclasses.field(default_factory=_model)  # the dense shape; moe: the Switch runs' routing
    train: TrainConfig = dataclasses.field(default_factory=_train)  # logs at least every evaluation
    data: DataConfig = dataclasses.field(default_factory=_data)  # the source is named by data_config_for
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
    # Runs trained at once, each in its own process with train.threads threads: on a few cores, small models
    # train more tokens side by side than with more threads each (docs/results/compare-side-by-side/). Every run
    # trains beside another (the last ones partly alone), so times stay comparable; 1 = one run at a time.
    parallel_runs: int = 2
    only: tuple[str, ...] = ()  # train only runs with these names (empty = all)

    def __post_init__(self) -> None:
        self.only = tuple(str(n) for n in self.only)
        self._coerce_fields()
        objective = Objective.SPAN_CORRUPTION if self.model.is_encoder_decoder else Objective.CAUSAL_LM
        if (self.data.objective, self.data.seed) != (objective, self.train.seed):
            self.data = self.data.replace(objective=objective, seed=self.train.seed)
        if self.model.vocab_size != self.data.vocab_size:
            self.model = self.model.replace(vocab_size=self.data.vocab_size)
        self.validate()

    @property
    def routing(self) -> MoEConfig:
        """The routing settings every Switch run shares (``model.moe``)."""
        assert self.model.moe is not None  # validated
        return self.model.moe

    def validate(self) -> None:
        train = self.train
        self._require(self.model.moe is not None, "model.moe", "must hold the Switch runs' routing settings")
        self._require(
            self.routing.top_k == 1, "model.moe.top_k", "must be 1: the Switch runs route top-1 (see sweep.top2_*)"
        )
        self._require(self.data.vocab_size >= 512, "data.vocab_size", "must be >= 512 (bytes, specials and sentinels)")
        self._require(self.data.validation_batches >= 1, "data.validation_batches", "must be >= 1")
        self._require(train.threads is not None, "train.threads", "must be set: results depend on it")
        cuda = train.device in ("auto", "cpu") or train.device.startswith("cuda")
        self._require(cuda, "train.device", "must be 'cpu', 'cuda', 'cuda:N' or 'auto'")
        self.check(self.parallel_runs >= 1, "parallel_runs", "must be >= 1 (1 = one run at a time)")
        seeds = self.sweep.dense_seeds
        self._require(train.seed in seeds, "sweep.dense_seeds", f"must include the shared seed train.seed={train.seed}")

    def _require(self, condition: bool, path: str, allowed: str) -> None:
        """:meth:`check` for a field of a section, named by its dotted ``path``."""
        if not condition:
            raise invalid(type(self).__name__, path, self._at(path), allowed)

    def _at(self, path: str) -> Any:
        """The value at a dotted path (``model.moe.gate``) or short name (``gate``)."""
        value: Any = self
        for name in SHORT_NAMES.get(path, path).split("."):
            value = getattr(value, name)
        return value

    def replace(self, **changes: Any) -> Self:
        """A validated copy with ``changes`` applied. Keys are the plan's fields, short names (``steps=9``) or
        dotted paths (``**{"model.d_model": 64}``)."""
        data = self.to_dict()
        for name, value in changes.items():
            *sections, field = SHORT_NAMES.get(name, name).split(".")
            node = data
            for section in sections:
                if not isinstance(node.get(section), dict):
                    raise invalid(type(self).__name__, name, value, "names no field of the plan")
                node = node[section]
            node[field] = value.to_dict() if isinstance(value, Config) else value
        return type(self).from_dict(data)

    def with_overrides(self, overrides: Any) -> Self:
        """Apply ``path=value`` strings; a short name stands for its dotted path (``d_model=64``)."""
        return super().with_overrides(_dotted(item) for item in overrides)

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> Self:
        """The plan of a ``compare.json``, also one saved before the plan had sections (its fields flat)."""
        if not any(name in saved for name in SHORT_NAMES):
            return cls.from_dict(saved)
        return cls().replace(**{**_BEFORE_THE_FIELD, **saved})

    def train_config(self, seed: int) -> TrainConfig:
        """The optimiser and schedule every run shares; only ``seed`` differs for the extra dense seeds."""
        return self.train.replace(seed=seed, log_every=min(self.train.log_every, self.train.eval_every))

    def dense_model(self, vocab_size: int) -> ModelConfig:
        return self.model.replace(vocab_size=vocab_size, moe=None)

    def moe(self, num_experts: int, capacity_factor: float, top_k: int = 1) -> MoEConfig:
        """A run's routing: the shared settings with its experts and factor (top-2 renormalises its gates)."""
        shared = self.routing
        return shared.replace(
            num_experts=num_experts,
            top_k=top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=max(shared.eval_capacity_factor, capacity_factor) * top_k,
            gate=shared.gate if top_k == 1 else Gate.PROBABILITY,
        )


def _dotted(override: str) -> str:
    name, sep, value = override.partition("=")
    return f"{SHORT_NAMES.get(name.strip(), name.strip())}{sep}{value}"


def data_config_for(plan: ComparePlan, source: str | None = None, text_field: str | None = None) -> DataConfig:
    """The data every run reads: the plan's data section, reading ``source`` (a file, folder or dataset; None:
    the plan's, by default the built-in corpus) and its ``text_field``."""
    named = {"source": source, "text_field": text_field}
    return plan.data.replace(**{key: value for key, value in named.items() if value is not None})


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
            "name": self.name,
            "kind": self.kind.value,
            "seed": self.seed,
            "num_experts": self.num_experts,
            "capacity_factor": self.capacity_factor,
            "model": self.model.to_dict(),
        }


def dense_name(seed: int) -> str:
    return f"dense-seed{seed}"


def switch_name(num_experts: int, capacity_factor: float, default_factor: float) -> str:
    suffix = "" if capacity_factor == default_factor else f"-cf{capacity_factor:g}"
    return f"switch-{num_experts}{suffix}"


def plan_runs(plan: ComparePlan, vocab_size: int) -> list[RunSpec]:
    """All runs of ``plan`` in training order: dense (reference seed first), expert sweep, capacity factors, top-2.

    ``plan.only`` keeps the named runs; unknown names are an error listing the known ones.
    """
    dense, sweep, seed = plan.dense_model(vocab_size), plan.sweep, plan.train.seed
    default_factor = plan.routing.capacity_factor
    seeds = [seed, *(s for s in sweep.dense_seeds if s != seed)]
    runs = [RunSpec(dense_name(s), RunKind.DENSE, dense, s, 1, None) for s in seeds]
    switch_points = [(e, default_factor) for e in sweep.expert_counts]
    switch_points += [(sweep.capacity_experts, f) for f in sweep.capacity_factors]
    seen: set[str] = set()
    for experts, factor in switch_points:
        name = switch_name(experts, factor, default_factor)
        if name not in seen:
            seen.add(name)
            model = dense.replace(moe=plan.moe(experts, factor))
            runs.append(RunSpec(name, RunKind.SWITCH, model, seed, experts, factor))
    if sweep.top2_experts is not None:
        experts, factor = sweep.top2_experts, sweep.top2_capacity_factor
        model = dense.replace(moe=plan.moe(experts, factor, top_k=2))
        runs.append(RunSpec(f"top2-{experts}", RunKind.TOP2, model, seed, experts, factor))
    if plan.only:
        known = [r.name for r in runs]
        unknown = sorted(set(plan.only) - set(known))
        if unknown:
            raise ValueError(f"ComparePlan.only names unknown run(s) {unknown}; this plan's runs are {known}")
        runs = [r for r in runs if r.name in plan.only]
    return runs

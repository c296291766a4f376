"""Read finished (or partly finished) runs back from their folders: curves, throughput, sizes and expert load.

The report and the plots are computed from these records alone, so they can be redrawn at any time without
retraining, and a comparison still running can be inspected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from switchformer.experiments.folder import DISTILL_PREFIX, MACHINE_FILE, SPEC_FILE, RunKind, read_json, run_folders
from switchformer.experiments.speedup import Curve, seed_noise
from switchformer.models.config import ModelConfig
from switchformer.models.flops import count_parameters
from switchformer.run_folder import read_summary

if TYPE_CHECKING:
    from switchformer.distill.run import DistillResult

_KIND_ORDER = {RunKind.DENSE: 0, RunKind.SWITCH: 1, RunKind.TOP2: 2, RunKind.DISTILLED: 3}


@dataclasses.dataclass
class RunResult:
    """What the report needs from one run folder."""

    name: str
    kind: RunKind
    seed: int
    num_experts: int
    capacity_factor: float | None
    top_k: int
    curve: Curve
    steps: int  # last step logged
    train_seconds: float  # training time (evaluation excluded) up to that step
    tokens_per_second: float
    params_total: int
    params_active: int
    load: dict[str, list[float]]  # Switch layer -> share of tokens per expert over the last logging interval
    dropped_fraction: float | None  # mean over Switch layers, last logging interval
    load_average: float | None  # 5-minute load average at the end of the run (= cores: every core busy)
    folder: Path
    cores: int | None = None  # of the machine that trained the run (None: not recorded)

    @property
    def final_loss(self) -> float:
        return self.curve.final_loss

    def up_to(self, step: float) -> RunResult:
        """This result with its curve cut at ``step``, to compare runs of a comparison still in progress fairly."""
        keep = sum(1 for s in self.curve.steps if s <= step)
        c = self.curve
        return dataclasses.replace(self, curve=Curve(c.steps[:keep], c.seconds[:keep], c.losses[:keep]))

    @property
    def label(self) -> str:
        if self.kind is RunKind.DENSE:
            return f"dense (seed {self.seed})"
        if self.kind is RunKind.DISTILLED:
            return f"dense student of {self.name.removeprefix('distill-')}"
        what = "top-2 MoE" if self.kind is RunKind.TOP2 else "Switch"
        return f"{what}, {self.num_experts} experts, cf {self.capacity_factor:g}"


def read_run(folder: Path) -> RunResult | None:
    """The result of one run folder, or None if it has no spec or no evaluation yet."""
    # switchformer.training imports the trainer, which reading a folder does not need until it reads one.
    from switchformer.training.metrics import read_metrics

    spec = read_json(folder / SPEC_FILE)
    if spec is None:
        return None
    records = read_metrics(folder)
    evaluated = [r for r in records if "val_loss" in r]
    if not evaluated:
        return None
    model = ModelConfig.from_dict(spec["model"])
    total, active = count_parameters(model)
    curve = Curve(
        steps=tuple(float(r["step"]) for r in evaluated),
        seconds=tuple(float(r["elapsed_seconds"]) for r in evaluated),
        losses=tuple(float(r["val_loss"]) for r in evaluated),
    )
    last = records[-1]
    routing: dict[str, Any] = next((r["routing"] for r in reversed(records) if "routing" in r), {})
    machine = read_json(folder / MACHINE_FILE) or {}
    return RunResult(
        name=spec["name"],
        kind=RunKind(spec["kind"]),
        seed=int(spec["seed"]),
        num_experts=int(spec["num_experts"]),
        capacity_factor=spec["capacity_factor"],
        top_k=model.moe.top_k if model.moe is not None else 1,
        curve=curve,
        steps=int(last["step"]),
        train_seconds=float(last["elapsed_seconds"]),
        tokens_per_second=_tokens_per_second(folder, records),
        params_total=total,
        params_active=active,
        load={layer: stats["load"] for layer, stats in routing.items()},
        dropped_fraction=(sum(s["dropped_fraction"] for s in routing.values()) / len(routing)) if routing else None,
        load_average=float(machine["load_end"][1]) if machine else None,
        folder=folder,
        cores=machine.get("cpu_count"),
    )


def _tokens_per_second(folder: Path, records: list[dict[str, Any]]) -> float:
    summary = read_summary(folder)
    if summary is not None:
        return float(summary["tokens_per_second"])
    rates = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
    return sum(rates) / len(rates) if rates else 0.0


def dense_runs(results: Sequence[RunResult]) -> list[RunResult]:
    """The dense runs (one per dense seed): the reference, its noise estimate and the machine's timing noise."""
    return [r for r in results if r.kind is RunKind.DENSE]


def dense_noise(results: Sequence[RunResult]) -> float | None:
    """Run-to-run noise of the final loss, estimated from the dense seeds (None with fewer than two)."""
    return seed_noise([r.final_loss for r in dense_runs(results)])


@dataclasses.dataclass(frozen=True)
class ExpertSweep:
    """Final loss against the number of experts (the paper's Figure 4): the dense reference as 1 expert, then the
    Switch runs at the sweep's capacity factor and the reference's seed, by expert count."""

    capacity_factor: float | None  # the factor most Switch runs share (the capacity-factor runs vary it one each)
    points: list[tuple[int, float]]  # (experts, final validation loss)


def expert_sweep(results: Sequence[RunResult], reference: RunResult) -> ExpertSweep:
    factors = [r.capacity_factor for r in results if r.kind is RunKind.SWITCH]
    factor = max(set(factors), key=factors.count) if factors else None
    switch = sorted(
        (r.num_experts, r.final_loss)
        for r in results
        if r.kind is RunKind.SWITCH and r.capacity_factor == factor and r.seed == reference.seed
    )
    return ExpertSweep(factor, [(1, reference.final_loss), *switch])


def growth_runs(results: Sequence[RunResult], reference: RunResult) -> list[RunResult]:
    """The runs whose step speedup over ``reference`` is followed through training: all but the reference itself
    and distilled students (they start from a trained teacher, so their steps are not comparable)."""
    return [r for r in results if r.name != reference.name and r.kind is not RunKind.DISTILLED]


def read_results(output: Path, *, common_step: bool = True) -> list[RunResult]:
    """All runs of a comparison folder with at least one evaluation: dense first, then by experts and factor.

    With ``common_step``, curves are cut at the last step every run has reached, so a comparison still in
    progress compares all runs at the same step.
    """
    results = [r for r in (read_run(f) for f in run_folders(output)) if r is not None]
    results.sort(key=lambda r: (_KIND_ORDER[r.kind], r.num_experts, r.capacity_factor or 0.0, r.seed))
    return at_common_step(results) if common_step else results


def at_common_step(results: Sequence[RunResult]) -> list[RunResult]:
    """Every curve cut at the last step all runs have evaluated: runs compared on the same budget."""
    if not results:
        return []
    last = min(r.curve.steps[-1] for r in results)
    return [r.up_to(last) for r in results]


def read_distillations(output: Path) -> list[tuple[Path, DistillResult]]:
    """Distillation run folders of a comparison with their results (for re-plotting without retraining)."""
    from switchformer.distill.run import read_result  # the distill package imports its trainer

    found = ((folder, read_result(folder)) for folder in run_folders(output, DISTILL_PREFIX))
    return [(folder, result) for folder, result in found if result is not None]

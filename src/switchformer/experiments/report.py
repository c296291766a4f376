"""The comparison report: a table in the spirit of the paper's Table 1, the acceptance checks, and plots.

Everything is computed from the run folders (:mod:`switchformer.experiments.results`), so ``write_report`` can be
called again at any time without retraining.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from switchformer.experiments.folder import RunKind, load_plan
from switchformer.experiments.plots import distillation_plot, write_plots
from switchformer.experiments.results import (
    RunResult,
    at_common_step,
    dense_noise,
    dense_runs,
    expert_sweep,
    growth_runs,
    read_distillations,
    read_results,
)
from switchformer.experiments.speedup import (
    TimeToTarget,
    mean_curve,
    milestones,
    monotone_within,
    step_speedup_at,
    time_to_target,
)
from switchformer.moe.config import Gate
from switchformer.run_folder import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

REQUIRED_STEP_SPEEDUP = 1.3  # the best Switch run needs 1.3x fewer steps than dense ...
NOISE_SIGMAS = 2.0  # ... and "does not get worse with more experts" means by no more than 2 seed std devs
GROWTH_COLUMNS = 6  # evaluation steps in the "speedup as training goes on" table


@dataclasses.dataclass(frozen=True)
class AgainstSeeds:
    """The best Switch run measured against every dense seed, not only its same-seed twin: how far the headline
    moves with the reference's seed. The mean curve of the seeds is the steadier reference."""

    mean_final_loss: float
    mean: TimeToTarget  # to the mean curve's final loss, against the mean curve
    per_seed: dict[str, float | None]  # dense run -> step speedup to that run's own final loss

    def line(self, best: str, reference: str) -> str:
        seeds = ", ".join(f"`{name}` {_x(speedup)}" for name, speedup in self.per_seed.items())
        return (
            f"- Against every dense seed (for information; the check above uses `{reference}`, which shares the "
            f"Switch runs' seed): `{best}` needs {_x(self.mean.step_speedup)} fewer steps and "
            f"{_x(self.mean.time_speedup)} less time to the mean curve of the {len(self.per_seed)} dense seeds "
            f"(final loss {self.mean_final_loss:.4f}); step speedup against each alone: {seeds}."
        )


@dataclasses.dataclass
class Verdict:
    """The acceptance checks, each with the numbers behind it."""

    reference: str
    target_loss: float
    noise_std: float | None
    best_by_steps: str | None
    best_step_speedup: float | None
    best_time_speedup: float | None  # of the same run
    speedup_ok: bool
    sweep: list[tuple[int, float]]  # (experts, final loss), dense = 1 expert
    sweep_ok: bool | None  # None without a noise estimate
    against_seeds: AgainstSeeds | None = None  # None with one dense seed or no Switch run at the dense loss

    def lines(self) -> list[str]:
        noise = f"{self.noise_std:.4f}" if self.noise_std is not None else "n/a (one dense seed)"
        out = [
            f"- Reference: `{self.reference}`, final validation loss {self.target_loss:.4f}; "
            f"run-to-run noise (std of the dense seeds' final losses): {noise}.",
        ]
        if self.best_by_steps is None:
            out.append("- No Switch run reached the dense model's final loss: **speedup check FAILED**.")
        else:
            verdict = "passed" if self.speedup_ok else "FAILED"
            out.append(
                f"- Best Switch run by steps: `{self.best_by_steps}`, {_x(self.best_step_speedup)} fewer steps and "
                f"{_x(self.best_time_speedup)} less training time to the dense final loss (required: >= "
                f"{REQUIRED_STEP_SPEEDUP}x steps and > 1x time): **{verdict}**."
            )
            if self.against_seeds is not None:
                out.append(self.against_seeds.line(self.best_by_steps, self.reference))
        sweep = ", ".join(f"{e}: {loss:.4f}" for e, loss in self.sweep)
        if self.sweep_ok is None:
            out.append(f"- Final loss by experts ({sweep}); no noise estimate, so no verdict (run two dense seeds).")
        else:
            verdict = "passed" if self.sweep_ok else "FAILED"
            out.append(
                f"- Final loss by number of experts (1 = dense): {sweep}; never worse than the previous count by more "
                f"than {NOISE_SIGMAS:g} noise std: **{verdict}**."
            )
        return out


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "n/a"


def _num(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "not reached"


def reference_run(results: Sequence[RunResult]) -> RunResult:
    """The dense run every speedup is measured against: the one sharing the Switch runs' seed (the first dense)."""
    dense = dense_runs(results)
    if not dense:
        raise ValueError("the comparison has no evaluated dense run yet; the report needs it as the reference")
    sparse_seeds = {r.seed for r in results if r.kind is not RunKind.DENSE}
    return next((r for r in dense if r.seed in sparse_seeds), dense[0])


def speedups(results: Sequence[RunResult], reference: RunResult) -> dict[str, TimeToTarget]:
    """Time to the reference's final loss; none for a distilled student, which starts from a trained teacher."""
    none = TimeToTarget(None, None, None, None)
    return {
        r.name: none if r.kind is RunKind.DISTILLED else time_to_target(r.curve, reference.final_loss, reference.curve)
        for r in results
    }


def verdict(results: Sequence[RunResult]) -> Verdict:
    reference = reference_run(results)
    table = speedups(results, reference)
    noise = dense_noise(results)
    switch = [r for r in results if r.kind is RunKind.SWITCH and table[r.name].step_speedup is not None]
    best = max(switch, key=lambda r: table[r.name].step_speedup or 0.0, default=None)
    best_steps = table[best.name].step_speedup if best else None
    best_time = table[best.name].time_speedup if best else None
    speedup_ok = bool(best_steps and best_time and best_steps >= REQUIRED_STEP_SPEEDUP and best_time > 1.0)
    sweep = expert_sweep(results, reference).points
    sweep_ok = monotone_within([loss for _, loss in sweep], NOISE_SIGMAS * noise) if noise is not None else None
    return Verdict(
        reference=reference.name,
        target_loss=reference.final_loss,
        noise_std=noise,
        best_by_steps=best.name if best else None,
        best_step_speedup=best_steps,
        best_time_speedup=best_time,
        speedup_ok=speedup_ok,
        sweep=sweep,
        sweep_ok=sweep_ok,
        against_seeds=against_seeds(results, best),
    )


def against_seeds(results: Sequence[RunResult], best: RunResult | None) -> AgainstSeeds | None:
    """``best`` against each dense seed and against their mean curve (None with fewer than two dense seeds)."""
    dense = dense_runs(results)
    if best is None or len(dense) < 2:
        return None
    mean = mean_curve([r.curve for r in dense])
    if mean is None:
        return None
    per_seed = {r.name: time_to_target(best.curve, r.final_loss, r.curve).step_speedup for r in dense}
    return AgainstSeeds(mean.final_loss, time_to_target(best.curve, mean.final_loss, mean), per_seed)


def table_lines(results: Sequence[RunResult], reference: RunResult) -> list[str]:
    table = speedups(results, reference)
    lines = [
        "| run | experts | capacity factor | params (total) | params (active) | steps trained | final val loss "
        "| steps to dense loss | time to dense loss (s) | speedup (steps) | speedup (time) | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        t = table[r.name]
        cf = f"{r.capacity_factor:g}" if r.capacity_factor is not None else "-"
        experts = f"{r.num_experts} (top-{r.top_k})" if r.num_experts > 1 else "-"
        speed = [_num(t.steps, ".0f"), _num(t.seconds, ".0f"), _x(t.step_speedup), _x(t.time_speedup)]
        if r.kind is RunKind.DISTILLED:  # see speedups()
            speed = ["-"] * len(speed)
        lines.append(
            f"| {r.name} | {experts} | {cf} | {r.params_total / 1e6:.2f}M | {r.params_active / 1e6:.2f}M | {r.steps} "
            f"| {r.final_loss:.4f} | {' | '.join(speed)} | {r.tokens_per_second:,.0f} |"
        )
    return lines


def growth_lines(results: Sequence[RunResult], reference: RunResult) -> list[str]:
    """How the step speedup develops: at each of a few evaluation steps N, the dense reference's steps to its own
    loss at N over each run's steps to that loss: whether the sparse lead grows with training.

    Given the whole curves (not cut at the common step), a run added to a finished comparison shows its speedup as
    far as it has got, beside the others' over the whole budget."""
    columns = milestones(reference.curve.steps, GROWTH_COLUMNS)
    rows = growth_runs(results, reference)
    if len(columns) < 2 or not rows:
        return []
    lines = [
        "### Speedup as training goes on",
        "",
        f"Step speedup had every run stopped at step N: `{reference.name}`'s steps to its own validation loss at N, "
        "divided by the run's steps to that loss; every run as far as it has trained (- : not that far yet).",
        "",
        "| run | " + " | ".join(f"N = {n:.0f}" for n in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for r in rows:
        cells = (_growth_cell(r, reference, n) for n in columns)
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _growth_cell(run: RunResult, reference: RunResult, step: float) -> str:
    """The speedup at ``step``; a run that stopped short of ``step`` without reaching the reference's loss there
    has no speedup yet (a run that did reach it has one, however short it is)."""
    speedup = step_speedup_at(run.curve, reference.curve, step)
    return "-" if speedup is None and run.curve.steps[-1] < step else _x(speedup)


def _progress_lines(results: Sequence[RunResult]) -> list[str]:
    """A warning when the runs are not all finished: the table then compares them at their common step."""
    if len({r.steps for r in results}) == 1:
        return []
    common = int(min(r.curve.steps[-1] for r in results))
    behind = ", ".join(f"{r.name} at step {r.steps}" for r in results)
    return [
        f"**In progress** ({behind}): losses and speedups are compared at step {common}, the last step every run "
        "has evaluated; the speedup-by-step table and the loss and speedup plots show each run as far as it has "
        "trained.",
        "",
    ]


def _every(n: int) -> str:
    return {1: "in every FFN", 2: "in every other FFN"}.get(n, f"in every {n}th FFN")


def _at_once(parallel_runs: int) -> str:
    """How the latest session trained its runs (timings depend on it; the history lists every session)."""
    return "one run at a time" if parallel_runs == 1 else f"{parallel_runs} runs at a time, side by side"


def _settings_lines(output: Path) -> list[str]:
    """The shared settings of every run, from the comparison folder's saved plan."""
    try:
        plan, data = load_plan(output)
    except ValueError:
        return []
    model, train, routing = plan.model, plan.train, plan.routing
    return [
        f"- Data: {data.source or 'built-in corpus (Python standard library sources)'}; {data.objective.value}, "
        f"BPE vocabulary {data.vocab_size}, {data.batch_size} x {data.sequence_length} tokens a step",
        f"- Model: {model.architecture.value}, d_model {model.d_model}, d_ff {model.d_ff} (each expert), "
        f"{model.num_layers} layers, {model.num_heads} heads, Switch layers {_every(model.sparse_every)}, init scale "
        f"{model.init_scale:g}, {_dropout(model.dropout)}",
        f"- Training: AdamW lr {train.lr:g}, {train.schedule.value} schedule, {train.warmup_steps} warmup steps, "
        f"{train.steps} steps, evaluation every {train.eval_every} steps, {_PRECISION_TEXT[train.precision.value]}, "
        f"device {train.device}, torch threads: {train.threads} a run, {_at_once(plan.parallel_runs)}; "
        f"load-balancing coefficient {routing.load_balancing_loss_coef:g}, eval capacity factor "
        f"{routing.eval_capacity_factor:g} (x2 for top-2)",
        f"- Switch gate: {_GATE_TEXT[routing.gate]}; top-2 renormalises its two gates to sum to 1",
    ]


def _dropout(rate: float) -> str:
    return "no dropout" if rate == 0 else f"dropout {rate:g}"


_PRECISION_TEXT = {
    "fp32": "float32",
    "bf16": "bf16 autocast (router in float32)",
    "auto": "bf16 autocast on CUDA, float32 on CPU",
}

_GATE_TEXT = {
    Gate.PROBABILITY: "the paper's, y = p_i(x) E_i(x)",
    Gate.STRAIGHT_THROUGH: "straight-through, y = E_i(x) in value with the paper's router gradient",
}


def _machine_lines(results: Sequence[RunResult]) -> list[str]:
    """How busy and how steady the machine was: the load at the end of each run, and the timing noise."""
    loads = ", ".join(f"{r.name} {r.load_average:.2f}" for r in results if r.load_average is not None)
    cores = {r.cores for r in results if r.load_average is not None}
    on = f"; {cores.pop()} cores" if len(cores) == 1 and None not in cores else ""
    lines = [f"Machine load (5-minute load average at the end of each run{on}): {loads}."] if loads else []
    lines += _throughput_noise_lines(results)
    return [part for line in lines for part in (line, "")]  # one paragraph each


def _throughput_noise_lines(results: Sequence[RunResult]) -> list[str]:
    """The dense seeds cost the same per step, so the spread of their tokens/s is the machine's own timing noise:
    no time speedup can be told apart from 1x more finely than that."""
    rates = [r.tokens_per_second for r in dense_runs(results) if r.tokens_per_second > 0]
    if len(rates) < 2:
        return []
    spread = max(rates) / min(rates)
    return [
        f"Timing noise: the dense seeds, identical in cost, ran at {' / '.join(f'{r:,.0f}' for r in rates)} "
        f"tokens/s ({spread:.2f}x apart): a time speedup closer to 1x than that is within the machine's timing noise."
    ]


def distillation_lines(output: Path, report_dir: Path) -> list[str]:
    """The distilled students' results, each with its curve against its no-teacher control (``distill-NAME.png``)."""
    lines: list[str] = []
    for folder, result in read_distillations(output):
        lines += result.lines()
        plot = distillation_plot(folder, result, report_dir / f"{folder.name}.png")
        if plot is not None:
            lines += ["", f"![{folder.name}]({plot.name})"]
    return lines


def _result_row(r: RunResult) -> dict[str, float]:
    return {
        "final_val_loss": r.final_loss,
        "steps": r.steps,
        "train_seconds": r.train_seconds,
        "tokens_per_second": r.tokens_per_second,
        "params_total": r.params_total,
        "params_active": r.params_active,
    }


def write_report(output: Path, *, report_dir: Path | None = None, header: Sequence[str] = ()) -> Path:
    """Write ``report.md``, ``results.json`` and the PNG plots for the comparison in ``output``.

    ``report_dir`` (default: ``output``) is where they go, e.g. ``docs/results/NAME`` while the run folders with
    their checkpoints stay out of the repository. ``header`` lines (command, date, machine load) open the report.
    Distilled students (``compare --distill``) get a section of their own.
    """
    whole = read_results(output, common_step=False)  # every run as far as it has trained
    if not whole:
        raise ValueError(f"{output} has no evaluated run yet; nothing to report")
    results = at_common_step(whole)  # the table and the checks: every run on the same budget
    report_dir = Path(report_dir or output)
    report_dir.mkdir(parents=True, exist_ok=True)
    reference = reference_run(results)
    whole_reference = next(r for r in whole if r.name == reference.name)
    check = verdict(results)
    plots = write_plots(results, reference, report_dir, whole=whole)
    lines = ["# Switch vs dense: time to quality", "", *header, *_settings_lines(output), ""]
    lines += ["## Results", "", *_progress_lines(results), *table_lines(results, reference), ""]
    lines += [
        "Speedups are the dense reference's steps (or training seconds, evaluation excluded) to reach its own "
        "final validation loss, divided by the run's; crossings are linearly interpolated between evaluations. "
        "Active parameters are those one token uses (its top-k experts). A distilled student starts from its trained "
        "teacher, so its time to quality is not comparable and is left out (it also trains after the runs, alone, "
        "with the threads they shared, so neither are its tokens/s).",
        "",
        *growth_lines(whole, whole_reference),
        *_machine_lines(results),
        "## Checks",
        "",
        *check.lines(),
        "",
    ]
    distillation = distillation_lines(output, report_dir)
    if distillation:
        lines += ["## Distillation", "", *distillation, ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path = atomic_write_text(report_dir / "report.md", "\n".join(lines))
    table = speedups(results, reference)
    rows = {r.name: {**_result_row(r), **dataclasses.asdict(table[r.name])} for r in results}
    checks = dataclasses.asdict(check)
    atomic_write_json(report_dir / "results.json", {"runs": rows, "checks": checks}, sort_keys=False)
    logger.info("report written to %s", path)
    return path

"""Experiments: the sparse-vs-dense comparison (``switchformer compare``), its report and plots."""

from switchformer.experiments.plan import ComparePlan, RunKind, RunSpec, plan_runs
from switchformer.experiments.report import write_report
from switchformer.experiments.runner import RunOutcome, RunStatus, data_config_for, load_plan, run_comparison
from switchformer.experiments.speedup import Curve, TimeToTarget, first_crossing, time_to_target

__all__ = [
    "ComparePlan",
    "Curve",
    "RunKind",
    "RunOutcome",
    "RunSpec",
    "RunStatus",
    "TimeToTarget",
    "data_config_for",
    "first_crossing",
    "load_plan",
    "plan_runs",
    "run_comparison",
    "time_to_target",
    "write_report",
]

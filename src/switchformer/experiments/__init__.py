"""Experiments: the sparse-vs-dense comparison (``switchformer compare``), its report and plots.

Names are imported on first use, so that reading a comparison (``experiments.report``) does not import the training
machinery the runner needs.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "folder": ("RunKind", "load_plan"),
    "plan": ("ComparePlan", "RunSpec", "SweepConfig", "data_config_for", "plan_runs"),
    "report": ("write_report",),
    "runner": ("RunOutcome", "RunStatus", "run_comparison"),
    "speedup": ("Curve", "TimeToTarget", "first_crossing", "time_to_target"),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)

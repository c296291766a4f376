"""A comparison folder's layout, and its plan read back: all the report, the plots and ``--replot`` need to find.

    OUTPUT/compare.json          the plan and the data config (a rerun must match them, but for the fields that may
                                 change and the runs it adds: the saved sweep is the union of every command's)
    OUTPUT/data/                 tokenizer and token arrays, shared by all runs (prepared once, then cached)
    OUTPUT/runs/NAME/            a run folder (:mod:`switchformer.run_folder`) with spec.json and machine.json
    OUTPUT/report_header.json    the latest training session's command, date and load, kept for ``--replot``
    OUTPUT/commands.jsonl        every training session of the folder (:mod:`.history`)

This module imports nothing of the training machinery, so reading a comparison costs no trainer import.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from switchformer.data import DataConfig
    from switchformer.experiments.plan import ComparePlan

PLAN_FILE = "compare.json"
DATA_DIR = "data"
RUNS_DIR = "runs"
SPEC_FILE = "spec.json"  # the run's name, kind, seed, experts, capacity factor and model config
MACHINE_FILE = "machine.json"  # load averages when a run started and ended, cores, runs trained at once
HEADER_FILE = "report_header.json"
DISTILL_PREFIX = "distill-"  # runs/distill-NAME: the best Switch run NAME distilled into a dense student


class RunKind(enum.Enum):
    """What a run of the comparison is (``spec.json``'s ``kind``)."""

    DENSE = "dense"  # the FLOP-matched baseline: every FFN dense
    SWITCH = "switch"  # top-1 routing (the paper's Switch layer)
    TOP2 = "top2"  # the top-2 "MoE" baseline (Shazeer 2017 / GShard routing)
    DISTILLED = "distilled"  # a dense student distilled from a Switch teacher (paper, section 4.2)


def run_dir(output: Path | str, name: str) -> Path:
    return Path(output) / RUNS_DIR / name


def run_folders(output: Path | str, prefix: str = "") -> list[Path]:
    """The comparison's run folders whose names start with ``prefix``, sorted by name."""
    return sorted((Path(output) / RUNS_DIR).glob(f"{prefix}*/"))


def read_json(path: Path) -> Any:
    """A JSON file of the folder, or None where there is none yet."""
    return json.loads(path.read_text()) if path.is_file() else None


def load_plan(output: Path | str) -> tuple[ComparePlan, DataConfig]:
    """The plan and data config a comparison folder was made with, from any version's ``compare.json``."""
    # The plan holds a TrainConfig, and importing switchformer.training imports the trainer: only when asked.
    from switchformer.data import DataConfig
    from switchformer.experiments.plan import ComparePlan

    saved = read_json(Path(output) / PLAN_FILE)
    if saved is None:
        raise ValueError(f"{output} is not a comparison folder (no {PLAN_FILE}); run `switchformer compare` first")
    return ComparePlan.from_saved(saved["plan"]), DataConfig.from_dict(saved["data"])

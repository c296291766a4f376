"""A comparison folder written before the plan had sections (tests/fixtures/legacy/compare, its plan flat) loads
into the same plan, re-plots, and a rerun with more steps resumes its runs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from switchformer.cli.main import main
from switchformer.experiments.folder import load_plan
from switchformer.experiments.plan import SHORT_NAMES, plan_runs
from switchformer.models.config import ModelConfig
from switchformer.training.config import TrainConfig
from switchformer.training.metrics import read_metrics

FIXTURE = Path(__file__).parents[1] / "fixtures" / "legacy"
RUNS = ["dense-seed0", "switch-2"]


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Path:
    """A copy of the fixture to work in; its data source is the relative path ``corpus``."""
    shutil.copytree(FIXTURE, tmp_path / "legacy")
    monkeypatch.chdir(tmp_path / "legacy")
    return Path("compare")


def compare(monkeypatch, *args: str) -> int:
    argv = ["compare", "--output", "compare", *args, "--no-progress"]
    monkeypatch.setattr(sys, "argv", ["switchformer", *argv])
    return main(argv)


def at(config: dict, path: str):
    for name in path.split("."):
        config = config[name]
    return config


def test_the_flat_plan_loads_with_every_field_where_it_now_lives_and_plans_the_runs_it_trained(legacy):
    saved = json.loads((legacy / "compare.json").read_text())
    plan, data = load_plan(legacy)
    sectioned = plan.to_dict()
    assert {name: at(sectioned, path) for name, path in SHORT_NAMES.items()} == {
        name: saved["plan"][name] for name in SHORT_NAMES
    }
    assert (plan.parallel_runs, plan.only) == (1, tuple(RUNS))
    assert data.to_dict() == saved["data"] and data.source == "corpus"
    specs = {name: json.loads((legacy / "runs" / name / "spec.json").read_text()) for name in RUNS}
    vocab = specs["dense-seed0"]["model"]["vocab_size"]  # the trained tokenizer's
    planned = {spec.name: spec for spec in plan_runs(plan, vocab)}
    assert planned.keys() == specs.keys()
    for name, saved_spec in specs.items():  # fields added to the model since keep their defaults
        assert {**planned[name].to_dict(), "model": None} == {**saved_spec, "model": None}
        assert planned[name].model == ModelConfig.from_dict(saved_spec["model"])
    checkpoint = json.loads(
        (legacy / "runs" / "switch-2" / "checkpoints" / "step-00000004" / "config.json").read_text()
    )
    assert plan.train_config(0) == TrainConfig.from_dict(checkpoint["train"])


def test_the_old_folder_replots(legacy, monkeypatch):
    assert compare(monkeypatch, "--replot", "--report", "docs") == 0
    report = Path("docs/report.md").read_text()
    assert all(f"| {name} |" in report for name in RUNS)
    assert "d_model 16, d_ff 32 (each expert), 2 layers, 2 heads" in report and "BPE vocabulary 512" in report
    assert "- Report re-plotted from the run folders" in report


def test_two_more_steps_resume_the_old_runs_and_the_folder_keeps_its_plan(legacy, monkeypatch):
    before = {name: read_metrics(legacy / "runs" / name) for name in RUNS}
    plan = load_plan(legacy)[0]
    assert compare(monkeypatch, "--steps", "6", "--only", ",".join(RUNS)) == 0
    for name in RUNS:
        records = read_metrics(legacy / "runs" / name)
        assert [r["step"] for r in records] == [2, 4, 6] and records[:2] == before[name]
    assert load_plan(legacy)[0] == plan.replace(steps=6)
    assert "model" in json.loads((legacy / "compare.json").read_text())["plan"]  # saved with its sections now
    assert compare(monkeypatch, "--steps", "6", "--only", ",".join(RUNS), "--set", "d_model=32") == 2  # refused

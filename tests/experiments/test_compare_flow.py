"""A whole comparison on tiny settings: every run trains, the report and all plots appear, reruns skip or resume."""

from __future__ import annotations

import json
import logging
import re

import pytest

from switchformer.experiments.folder import load_plan
from switchformer.experiments.plan import data_config_for
from switchformer.experiments.report import write_report
from switchformer.experiments.results import read_results
from switchformer.experiments.runner import RunStatus, _time_left_text, run_comparison, write_or_check_plan
from switchformer.training.metrics import read_metrics

from .conftest import legacy_plan_record, tiny_plan

NAMES = ["dense-seed0", "dense-seed1", "switch-2", "switch-4", "switch-4-cf1", "top2-4"]


def test_comparison_report_plots_skip_resume_and_replot(tmp_path, corpus):
    plan = tiny_plan(parallel_runs=2)  # the default: two runs side by side
    data = data_config_for(plan, str(corpus))
    out = tmp_path / "cmp"
    outcomes = run_comparison(plan, out, data)
    assert [o.spec.name for o in outcomes] == NAMES
    assert {o.status for o in outcomes} == {RunStatus.TRAINED}

    report = write_report(out, report_dir=tmp_path / "docs", header=["- Command: `test`"])
    text = report.read_text()
    assert "- Command: `test`" in text and "## Checks" in text and "speedup (steps)" in text
    for name in NAMES:
        assert f"| {name} |" in text
    growth = text.split("### Speedup as training goes on")[1].split("##")[0]
    assert "| run | N = " in growth and "| switch-2 |" in growth and "| dense-seed0 |" not in growth  # not vs itself
    pngs = {p.name: p.stat().st_size for p in (tmp_path / "docs").glob("*.png")}
    expected = {f"{name}.png" for name in ("loss_vs_steps", "loss_vs_time", "speedup_vs_steps", "loss_vs_experts")}
    expected.add("expert_load.png")
    assert set(pngs) == expected
    assert all(size > 10_000 for size in pngs.values())
    results = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert set(results["runs"]) == set(NAMES) and results["runs"]["dense-seed0"]["step_speedup"] == 1.0
    assert results["checks"]["noise_std"] is not None  # two dense seeds give a noise estimate
    by_name = {r.name: r for r in read_results(out)}
    assert by_name["switch-4"].params_total > by_name["dense-seed0"].params_total
    assert by_name["switch-4"].params_active < by_name["top2-4"].params_active
    assert len(by_name["switch-4"].load) == 1 and len(by_name["switch-4"].load["decoder.1"]) == 4

    # Rerunning skips every finished run and leaves its log alone.
    before = read_metrics(out / "runs" / "switch-2")
    again = run_comparison(plan, out, data)
    assert {o.status for o in again} == {RunStatus.SKIPPED}
    assert read_metrics(out / "runs" / "switch-2") == before

    # More steps resume each selected run from its last checkpoint and extend its curve.
    longer = plan.replace(steps=9, only=("switch-2",))
    [extended] = run_comparison(longer, out, data)
    assert extended.status is RunStatus.RESUMED
    records = read_metrics(out / "runs" / "switch-2")
    assert [r["step"] for r in records] == [3, 6, 9] and records[:2] == before
    assert load_plan(out)[0].train.steps == 9

    # A different shape in the same folder is refused; re-plotting needs no training.
    with pytest.raises(ValueError, match="d_model"):
        run_comparison(plan.replace(d_model=64), out, data)
    for png in (tmp_path / "docs").glob("*.png"):
        png.unlink()
    write_report(out, report_dir=tmp_path / "docs")
    assert {p.name for p in (tmp_path / "docs").glob("*.png")} == expected


def test_folders_saved_before_the_gate_and_group_options_load_with_what_they_ran(tmp_path):
    """A compare.json without ``gate`` or ``group_size`` (earlier releases) replots with the paper's gate and
    1024-token groups, and a rerun with other values is refused instead of mixing settings in one folder."""
    plan = tiny_plan()
    data = data_config_for(plan)
    saved = {"plan": legacy_plan_record(plan), "data": data.to_dict()}
    del saved["plan"]["gate"], saved["plan"]["group_size"]
    (tmp_path / "compare.json").write_text(json.dumps(saved))
    loaded = load_plan(tmp_path)[0]
    assert (loaded.routing.gate.value, loaded.routing.group_size) == ("probability", 1024)
    with pytest.raises(ValueError, match="gate"):
        write_or_check_plan(tmp_path, plan.replace(group_size=1024), data)
    with pytest.raises(ValueError, match="group_size"):
        write_or_check_plan(tmp_path, plan.with_overrides(["gate=probability", "group_size=64"]), data)
    write_or_check_plan(tmp_path, plan.with_overrides(["gate=probability", "group_size=1024"]), data)  # accepted


def test_a_rerun_may_add_runs_to_a_folder_and_the_folder_keeps_every_run(tmp_path, corpus, caplog):
    """More experts, capacity factors or dense seeds on an existing folder add runs without retraining the others;
    the saved plan holds the union, so a plain rerun still knows every run, and a changed shape is still refused."""
    plan = tiny_plan(dense_seeds=(0,), expert_counts=(2,), capacity_factors=(), top2_experts=None)
    data = data_config_for(plan, str(corpus))
    out = tmp_path / "cmp"
    with caplog.at_level(logging.INFO, logger="switchformer.experiments.runner"):
        assert [o.spec.name for o in run_comparison(plan, out, data)] == ["dense-seed0", "switch-2"]
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compare: ")]
    assert re.fullmatch(r"compare: 1 of 2 runs done; about \d+ s to go \(\d+ s a run so far\)", progress[0])
    assert progress[1:] == ["compare: 2 of 2 runs done"]  # nothing left, no estimate
    before = read_metrics(out / "runs" / "switch-2")

    more = plan.replace(expert_counts=(4,), dense_seeds=(0, 1), only=("switch-4", "dense-seed1"))
    outcomes = run_comparison(more, out, data)
    assert [(o.spec.name, o.status) for o in outcomes] == [
        ("dense-seed1", RunStatus.TRAINED),
        ("switch-4", RunStatus.TRAINED),
    ]
    saved = load_plan(out)[0]
    assert (saved.sweep.expert_counts, saved.sweep.dense_seeds, saved.sweep.capacity_factors) == ((2, 4), (0, 1), ())
    assert read_metrics(out / "runs" / "switch-2") == before
    again = run_comparison(saved.replace(only=()), out, data)  # what a rerun without --only trains
    assert [o.spec.name for o in again] == ["dense-seed0", "dense-seed1", "switch-2", "switch-4"]
    assert {o.status for o in again} == {RunStatus.SKIPPED}
    assert [r.name for r in read_results(out)] == ["dense-seed0", "dense-seed1", "switch-2", "switch-4"]
    with pytest.raises(ValueError, match="capacity_factor"):
        run_comparison(more.replace(capacity_factor=2.0), out, data)


def test_the_time_left_is_the_median_run_so_far_times_the_runs_left():
    assert _time_left_text([60.0, 120.0, 600.0], 3) == "; about 6 min to go (2 min a run so far)"
    assert _time_left_text([540.0, 560.0], 7) == "; about 1 h 4 min to go (9 min a run so far)"  # 7 x 550 s = 64 min
    assert _time_left_text([12.4], 2) == "; about 25 s to go (12 s a run so far)"
    assert _time_left_text([60.0], 0) == "" and _time_left_text([], 4) == ""  # done, or nothing trained yet

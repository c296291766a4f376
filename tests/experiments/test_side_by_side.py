"""Runs trained side by side (``ComparePlan.parallel_runs``): same results as one at a time, a slot and a fresh
process per run, a failed run stops the rest, and the time-left estimate shares the runs among the slots."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import pytest

from switchformer.cli.compare import RunProgressBars
from switchformer.experiments.plan import ComparePlan, RunSpec, plan_runs
from switchformer.experiments.report import write_report
from switchformer.experiments.runner import (
    RunPlace,
    RunStatus,
    _time_left_text,
    data_config_for,
    load_plan,
    run_comparison,
    write_or_check_plan,
)
from switchformer.training.metrics import read_metrics

from .conftest import tiny_plan


@dataclasses.dataclass
class PlaceRecorder:
    """A picklable callbacks factory that writes down, from inside each run's process, where the run trained."""

    folder: Path
    fail_run: str | None = None

    def __call__(self, spec: RunSpec, place: RunPlace) -> tuple[()]:
        if spec.name == self.fail_run:
            raise ValueError(f"{spec.name} refused by the test")
        record = {"index": place.index, "total": place.total, "slot": place.slot, "text": str(place)}
        record["pid"] = os.getpid()
        (self.folder / f"{spec.name}.json").write_text(json.dumps(record))
        return ()


def test_side_by_side_trains_the_same_curves_as_one_run_at_a_time_each_in_its_own_process(tmp_path, corpus):
    plan = tiny_plan(dense_seeds=(0,), expert_counts=(2, 4), capacity_factors=(), top2_experts=None)
    data = data_config_for(plan, str(corpus))
    places = tmp_path / "places"
    places.mkdir()
    alone = run_comparison(plan.replace(parallel_runs=1), tmp_path / "alone", data)
    recorder = PlaceRecorder(places)
    together = run_comparison(plan.replace(parallel_runs=2), tmp_path / "together", data, callbacks=recorder)
    names = ["dense-seed0", "switch-2", "switch-4"]
    assert [o.spec.name for o in alone] == [o.spec.name for o in together] == names  # the plan's order
    assert {o.status for o in together} == {RunStatus.TRAINED}
    for name in names:  # one thread per run either way, so every loss is the same to the last bit
        losses = [(r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(tmp_path / "alone" / "runs" / name)]
        again = [(r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(tmp_path / "together" / "runs" / name)]
        assert again == losses and len(losses) == 2
    recorded = {name: json.loads((places / f"{name}.json").read_text()) for name in names}
    assert [recorded[n]["text"] for n in names] == ["1/3", "2/3", "3/3"]
    assert (recorded["dense-seed0"]["slot"], recorded["switch-2"]["slot"]) == (0, 1)  # the first two start at once
    assert recorded["switch-4"]["slot"] in (0, 1)
    pids = {r["pid"] for r in recorded.values()}
    assert len(pids) == 3 and os.getpid() not in pids  # a fresh process for every run
    assert load_plan(tmp_path / "together")[0].parallel_runs == 2
    report = write_report(tmp_path / "together", report_dir=tmp_path / "docs").read_text()
    assert "torch threads: 1 a run, 2 runs at a time, side by side" in report


def test_a_failed_run_stops_the_comparison_and_the_run_beside_it_finishes(tmp_path, corpus):
    plan = tiny_plan(dense_seeds=(0, 1), expert_counts=(2,), capacity_factors=(), top2_experts=None)
    data = data_config_for(plan, str(corpus))
    out, places = tmp_path / "cmp", tmp_path / "places"
    places.mkdir()
    with pytest.raises(ValueError, match="dense-seed0 refused by the test"):
        run_comparison(plan, out, data, callbacks=PlaceRecorder(places, fail_run="dense-seed0"))
    assert (out / "runs" / "dense-seed1" / "summary.json").is_file()  # started beside it, trained to the end
    assert not (out / "runs" / "switch-2").exists()  # never started
    outcomes = run_comparison(plan, out, data)  # a rerun trains what is missing
    assert [(o.spec.name, o.status) for o in outcomes] == [
        ("dense-seed0", RunStatus.TRAINED), ("dense-seed1", RunStatus.SKIPPED), ("switch-2", RunStatus.TRAINED),
    ]  # fmt: skip


def test_a_factory_that_cannot_be_pickled_is_refused_with_what_to_do(tmp_path, corpus):
    plan = tiny_plan(dense_seeds=(0,), expert_counts=(2,), capacity_factors=(), top2_experts=None)
    data = data_config_for(plan, str(corpus))
    with pytest.raises(ValueError, match=r"cannot be sent to the runs' processes .* parallel_runs=1"):
        run_comparison(plan, tmp_path / "cmp", data, callbacks=lambda spec, place: ())
    assert not (tmp_path / "cmp" / "runs").exists()


def test_how_many_runs_train_at_once_may_change_between_sessions_of_a_folder(tmp_path):
    plan = tiny_plan()
    data = data_config_for(plan)
    write_or_check_plan(tmp_path, plan.replace(parallel_runs=1), data)
    write_or_check_plan(tmp_path, plan.replace(parallel_runs=3), data)  # timings change, results do not
    assert load_plan(tmp_path)[0].parallel_runs == 3
    saved = json.loads((tmp_path / "compare.json").read_text())
    del saved["plan"]["parallel_runs"]  # a folder from before the field trained one run at a time
    (tmp_path / "compare.json").write_text(json.dumps(saved))
    assert load_plan(tmp_path)[0].parallel_runs == 1
    with pytest.raises(ValueError, match="parallel_runs"):
        ComparePlan(parallel_runs=0)


def test_the_time_left_shares_the_runs_left_among_the_runs_at_once():
    assert _time_left_text([540.0, 560.0], 7, at_once=2) == "; about 37 min to go (9 min a run so far)"  # 4 rounds
    assert _time_left_text([540.0, 560.0], 6, at_once=2) == "; about 28 min to go (9 min a run so far)"  # 3 rounds
    assert _time_left_text([600.0], 1, at_once=2) == "; about 10 min to go (10 min a run so far)"


def test_the_command_lines_progress_bars_travel_to_the_runs_process_and_draw_on_their_slots_line():
    factory = pickle.loads(pickle.dumps(RunProgressBars(leave=False)))
    [bar] = factory(plan_runs(tiny_plan(), 512)[2], RunPlace(3, 6, slot=1))
    assert bar.tqdm_kwargs == {"desc": "switch-2 [3/6]", "leave": False, "position": 1}

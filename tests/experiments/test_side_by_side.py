"""Runs trained side by side (``ComparePlan.parallel_runs``): they overlap, each in a fresh process and a slot,
with the same losses as one at a time; a failed or killed run stops the runs beside it at a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import logging.handlers
import os
import pickle
import signal
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from switchformer.cli.compare import RunProgressBars
from switchformer.experiments import console, side_by_side
from switchformer.experiments.folder import load_plan
from switchformer.experiments.plan import ComparePlan, RunSpec, data_config_for, plan_runs
from switchformer.experiments.report import write_report
from switchformer.experiments.runner import RunStatus, _time_left_text, run_comparison, write_or_check_plan
from switchformer.experiments.side_by_side import RunPlace, RunProcessError, StopWhenAsked, check_picklable
from switchformer.run_folder import finished_steps
from switchformer.training.callbacks import ProgressBar
from switchformer.training.metrics import read_metrics

from .conftest import BarDrawnHere, legacy_plan_record, tiny_plan

MEETING_TIMEOUT_S = 120.0  # process start-up (a torch import) on a busy machine with few cores


@dataclasses.dataclass
class RunRecorder:
    """A picklable callbacks factory that runs in each run's process: it writes down where the run trained, makes
    the runs named in ``meet`` wait for each other (so they must overlap), and fails or kills one run."""

    folder: Path
    meet: tuple[str, ...] = ()
    fail_run: str | None = None
    kill_run: str | None = None
    interrupt_run: str | None = None  # as a Ctrl-C would: SIGINT to that run's process
    bars: bool = False  # give each run a progress bar on its slot's line

    def __call__(self, spec: RunSpec, place: RunPlace) -> tuple[ProgressBar, ...]:
        record = {"index": place.index, "total": place.total, "slot": place.slot, "text": str(place)}
        (self.folder / f"{spec.name}.json").write_text(json.dumps({**record, "pid": os.getpid()}))
        if spec.name in self.meet:
            (self.folder / f"arrived-{spec.name}").touch()
            deadline = time.monotonic() + MEETING_TIMEOUT_S
            while not all((self.folder / f"arrived-{name}").exists() for name in self.meet):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{spec.name} never met {self.meet}: the runs did not train at the same time")
                time.sleep(0.05)
        if spec.name == self.fail_run:
            raise ValueError(f"{spec.name} refused by the test")
        if spec.name == self.kill_run:
            os._exit(9)
        if spec.name == self.interrupt_run:
            os.kill(os.getpid(), signal.SIGINT)
        return (ProgressBar(desc=spec.name, position=place.slot, leave=False),) if self.bars else ()


def small_plan(**changes) -> ComparePlan:
    base = {"dense_seeds": (0,), "expert_counts": (2,), "capacity_factors": (), "top2_experts": None}
    return tiny_plan(**base).replace(**changes)


def test_runs_train_at_the_same_time_in_their_own_processes_with_the_losses_of_one_at_a_time(
    tmp_path, corpus, monkeypatch, caplog
):
    plan = tiny_plan(dense_seeds=(0,), expert_counts=(2, 4), capacity_factors=(), top2_experts=None)
    data = data_config_for(plan, str(corpus))
    places = tmp_path / "places"
    places.mkdir()
    alone = run_comparison(plan, tmp_path / "alone", data)
    recorder = RunRecorder(places, meet=("dense-seed0", "switch-2"), bars=True)
    monkeypatch.setattr(console, "tqdm", BarDrawnHere)
    monkeypatch.setattr(BarDrawnHere, "drawn", [])
    caplog.set_level(logging.INFO)
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
    assert (recorded["dense-seed0"]["slot"], recorded["switch-2"]["slot"]) == (0, 1)
    assert recorded["switch-4"]["slot"] in (0, 1)
    pids = {r["pid"] for r in recorded.values()}
    assert len(pids) == 3 and os.getpid() not in pids  # a fresh process for every run
    machine = json.loads((tmp_path / "together" / "runs" / "switch-4" / "machine.json").read_text())
    assert (machine["runs_at_once"], machine["cpu_count"]) == (2, os.cpu_count())
    assert load_plan(tmp_path / "together")[0].parallel_runs == 2
    report = write_report(tmp_path / "together", report_dir=tmp_path / "docs").read_text()
    assert "torch threads: 1 a run, 2 runs at a time, side by side" in report
    # One process owns the terminal: this one drew every run's bar on its slot's line, to the last step, and
    # emitted the runs' log records through its own handlers (here pytest's).
    drawn = {bar.kwargs["desc"]: bar for bar in BarDrawnHere.drawn}
    assert sorted(drawn) == names and all(bar.closed and bar.steps == plan.train.steps for bar in drawn.values())
    assert (drawn["dense-seed0"].kwargs["position"], drawn["switch-2"].kwargs["position"]) == (0, 1)
    assert {"loss", "tok/s", "drop"} <= set(drawn["switch-4"].postfix)
    sent = {r.getMessage() for r in caplog.records if r.processName == "compare-switch-4"}
    assert "switch-4: training at step 0 of 6" in sent

    again = run_comparison(plan.replace(parallel_runs=2), tmp_path / "together", data, callbacks=recorder)
    assert {o.status for o in again} == {RunStatus.SKIPPED}  # finished runs are skipped in this process


def test_a_failed_run_stops_the_run_beside_it_at_a_checkpoint_and_never_starts_the_next(tmp_path, corpus):
    plan = small_plan(dense_seeds=(0, 1), steps=3000, eval_every=500, checkpoint_every=500)  # minutes, unstopped
    data = data_config_for(plan, str(corpus))
    out, places = tmp_path / "cmp", tmp_path / "places"
    places.mkdir()
    recorder = RunRecorder(places, meet=("dense-seed0", "dense-seed1"), fail_run="dense-seed0")
    with pytest.raises(ValueError, match="dense-seed0 refused by the test") as raised:
        run_comparison(plan.replace(parallel_runs=2), out, data, callbacks=recorder)
    assert "raised while training dense-seed0, in its process" in raised.value.__notes__[0]  # its traceback
    beside = out / "runs" / "dense-seed1"
    assert 1 <= finished_steps(beside) < plan.train.steps  # stopped early, with its summary and a checkpoint to resume
    assert any((beside / "checkpoints").iterdir())
    assert not (out / "runs" / "switch-2").exists()  # never started


def two_long_runs_that_meet(tmp_path: Path, corpus: Path, **trouble) -> tuple[ComparePlan, Callable[[], object]]:
    """Two runs side by side, far from done when ``trouble`` (a RunRecorder field) strikes one of them."""
    plan = small_plan(steps=3000, eval_every=500, checkpoint_every=500, parallel_runs=2)
    data = data_config_for(plan, str(corpus))
    (tmp_path / "places").mkdir()
    recorder = RunRecorder(tmp_path / "places", meet=("dense-seed0", "switch-2"), **trouble)
    return plan, lambda: run_comparison(plan, tmp_path / "cmp", data, callbacks=recorder)


def test_ctrl_c_in_a_runs_process_stops_it_and_the_run_beside_it_at_a_checkpoint(tmp_path, corpus):
    plan, compare = two_long_runs_that_meet(tmp_path, corpus, interrupt_run="dense-seed0")
    out = tmp_path / "cmp"
    with pytest.raises(KeyboardInterrupt):
        compare()
    for name in ("dense-seed0", "switch-2"):  # both kept their last step, which a rerun resumes from
        assert 1 <= finished_steps(out / "runs" / name) < plan.train.steps
        assert any((out / "runs" / name / "checkpoints").iterdir())


def test_a_killed_run_is_named_and_the_run_beside_it_stops(tmp_path, corpus):
    plan, compare = two_long_runs_that_meet(tmp_path, corpus, kill_run="switch-2")
    with pytest.raises(RunProcessError, match=r"training switch-2 exited with code 9 .*parallel_runs=1"):
        compare()
    assert 1 <= finished_steps(tmp_path / "cmp" / "runs" / "dense-seed0") < plan.train.steps


def test_the_stop_callback_ends_a_run_when_asked():
    class Flag:
        def __init__(self, value: bool) -> None:
            self.value = value

        def is_set(self) -> bool:
            return self.value

    trainer = types.SimpleNamespace(should_stop=False)
    StopWhenAsked(Flag(False)).on_step_end(trainer, {})
    assert trainer.should_stop is False  # this process has no parent process to lose
    StopWhenAsked(Flag(True)).on_step_end(trainer, {})
    assert trainer.should_stop is True


def test_a_factory_that_cannot_reach_the_runs_processes_is_refused_with_what_to_do(tmp_path, corpus, monkeypatch):
    data = data_config_for(small_plan(), str(corpus))
    with pytest.raises(ValueError, match=r"cannot be sent to the runs' processes .* parallel_runs=1"):
        run_comparison(small_plan(parallel_runs=2), tmp_path / "cmp", data, callbacks=lambda spec, place: ())
    assert not (tmp_path / "cmp").exists()  # refused before any work

    def typed_at_a_prompt(spec, place):
        return ()

    main = sys.modules["__main__"]
    typed_at_a_prompt.__module__, typed_at_a_prompt.__qualname__ = "__main__", "typed_at_a_prompt"
    monkeypatch.setattr(main, "typed_at_a_prompt", typed_at_a_prompt, raising=False)
    monkeypatch.delattr(main, "__file__", raising=False)
    pickle.dumps(typed_at_a_prompt)  # pickles by reference, but a spawned process could not import it
    with pytest.raises(ValueError, match="interactive session"):
        check_picklable(typed_at_a_prompt)
    monkeypatch.setattr(main, "__file__", "/somewhere/script.py", raising=False)
    monkeypatch.setattr(main, "__spec__", None, raising=False)
    check_picklable(typed_at_a_prompt)  # a script's own function: spawn imports the script in the run's process


def test_how_many_runs_train_at_once_may_change_between_sessions_of_a_folder(tmp_path):
    plan = tiny_plan()
    data = data_config_for(plan)
    write_or_check_plan(tmp_path, plan.replace(parallel_runs=1), data)
    write_or_check_plan(tmp_path, plan.replace(parallel_runs=3), data)  # timings change, results do not
    assert load_plan(tmp_path)[0].parallel_runs == 3
    saved = json.loads((tmp_path / "compare.json").read_text())
    saved["plan"] = legacy_plan_record(plan)
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


def test_the_parent_survives_messages_it_cannot_show():
    import multiprocessing

    receive, send = multiprocessing.Pipe(duplex=False)
    process = types.SimpleNamespace(is_alive=lambda: True)
    run = side_by_side._Running(1, plan_runs(tiny_plan(), 512)[0], 0, process, receive, 0.0)
    send.send(("bar", 7, "update", (1, {"loss": "1.0"})))  # a bar never opened, or closed twice
    send.send(("bar", 7, "close", None))
    send.send(("log", "not a log record"))
    send.send(("done", "outcome"))
    side_by_side._receive(run)
    assert run.final == ("done", "outcome") and run.console.bars == {}

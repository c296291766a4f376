"""One terminal for runs in other processes: their log records and bars go through the parent, which writes log
lines above the bars; a run outliving its parent keeps going to its next step's check."""

from __future__ import annotations

import io
import logging
import logging.handlers
import multiprocessing
import sys
import types

from switchformer.experiments import console
from switchformer.training.callbacks import ProgressBar

from .conftest import BarDrawnHere


def test_a_run_whose_parent_is_gone_keeps_training_to_its_next_step_check_instead_of_dying_on_the_pipe():
    receive, send = multiprocessing.Pipe(duplex=False)
    receive.close()  # the parent's end: nobody reads any more
    parent = console.ToParent(send)
    logging.getLogger("tests.orphan").addHandler(handler := logging.handlers.QueueHandler(parent))
    try:
        console.BarInParent(parent, interval=0.0).update(1)  # a bar figure, a log record, a result: no error
        logging.getLogger("tests.orphan").warning("still here")
        parent.send(("done", None))
    finally:
        logging.getLogger("tests.orphan").removeHandler(handler)
    assert parent.parent_gone


def test_while_bars_are_drawn_the_console_handler_writes_through_tqdm_with_its_own_level_and_nothing_is_added(
    monkeypatch, capsys
):
    root = logging.getLogger()
    terminal, elsewhere = logging.StreamHandler(sys.stderr), logging.StreamHandler(io.StringIO())
    terminal.setLevel(logging.WARNING)
    terminal.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    written = []
    monkeypatch.setattr(console.tqdm, "write", lambda text, file=None, **_: written.append((text, file)))
    monkeypatch.setattr(root, "handlers", [terminal, elsewhere])
    monkeypatch.setattr(root, "level", logging.INFO)
    with console.log_lines_above_the_bars():
        logging.getLogger("tests.bars").info("not for the console")
        logging.getLogger("tests.bars").warning("for the console")
        assert root.handlers[1] is elsewhere
    assert written == [("WARNING: for the console", sys.stderr)]
    assert root.handlers == [terminal, elsewhere] and "for the console" in elsewhere.stream.getvalue()
    monkeypatch.setattr(root, "handlers", [])
    with console.log_lines_above_the_bars():
        assert root.handlers == []


def test_a_runs_progress_bar_is_made_by_the_factory_it_is_given_and_keeps_its_figures(monkeypatch):
    monkeypatch.setattr(BarDrawnHere, "drawn", [])
    other = object()
    progress = ProgressBar(desc="switch-2 [1/2]", position=1)
    drawn, kept = console.bars_drawn_by(BarDrawnHere, [progress, other])
    assert kept is other and ProgressBar.make_bar is None  # given, not patched into the class
    dense = types.SimpleNamespace(moe=None)
    trainer = types.SimpleNamespace(config=types.SimpleNamespace(steps=6), step=2, model_config=dense)
    drawn.on_train_start(trainer)
    drawn.on_step_end(trainer, {"loss": 1.0, "tokens_per_second": 10.0, "lr": 1e-3})
    drawn.on_train_end(trainer, {})
    [bar] = BarDrawnHere.drawn
    assert bar.kwargs == {"total": 6, "initial": 2, "unit": "step", "dynamic_ncols": True} | progress.tqdm_kwargs
    assert (bar.steps, bar.postfix["loss"], bar.closed) == (1, "1.000", True)

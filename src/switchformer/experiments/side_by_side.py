"""Train a comparison's runs side by side, each in its own process (``ComparePlan.parallel_runs``).

The comparison's models are small, so a second torch thread shares little of a step's work: one-thread runs side
by side train more tokens than one run with the threads they share (docs/results/compare-side-by-side/). Each run
gets a fresh *spawned* interpreter (its own threads, memory and random state; fork would copy the parent's torch
thread pool), and the runs start in the plan's order, each in the lowest free slot (the line of its progress bar).

Stopping is shared: when a run fails or the parent is interrupted, a shared event asks every run still training
to stop after its current step, with a checkpoint, so a rerun resumes them; a run whose parent process died stops
the same way, so no orphan keeps writing into the folder, and a first Ctrl-C in the terminal (which reaches every
process) does too (a second one interrupts at once). The run's own error is raised in the parent, so the command
line reports it as it would with one run at a time.

The runs' log records and progress bars go through the parent (:mod:`.console`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import pickle
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from switchformer.experiments.console import (
    BarInParent,
    RunConsole,
    ToParent,
    bars_drawn_by,
    forward_logs,
    log_lines_above_the_bars,
)
from switchformer.experiments.plan import RunSpec
from switchformer.training.callbacks import Callback

logger = logging.getLogger(__name__)


class RunProcessError(RuntimeError):
    """A side-by-side run's process ended without a result (killed, e.g. out of memory, or crashed)."""


@dataclasses.dataclass(frozen=True)
class RunPlace:
    """Where a run stands in its comparison: ``index`` of ``total`` runs, and the ``slot`` (0-based) it trains in
    when runs train side by side, e.g. the line of its progress bar. Prints as ``"7/8"``."""

    index: int
    total: int
    slot: int = 0

    def __str__(self) -> str:
        return f"{self.index}/{self.total}"


CallbackFactory = Callable[[RunSpec, RunPlace], Sequence[Callback]]


def no_callbacks(spec: RunSpec, place: RunPlace) -> Sequence[Callback]:
    return ()


# train(spec, callbacks=...) -> the run's outcome; passed in so this module does not import the runner
TrainOne = Callable[..., Any]
RunEnded = Callable[[Any, float, int], None]  # (outcome, seconds, runs left) after each run, in the parent


_interrupted = False  # set in a run's process by its first Ctrl-C (see _stop_at_the_next_step_on_ctrl_c)


class StopWhenAsked(Callback):
    """Ends a side-by-side run after the current step (with a checkpoint) once ``stop`` is set, the parent died or
    Ctrl-C was pressed."""

    def __init__(self, stop: Any) -> None:
        self.stop = stop

    def on_step_end(self, trainer: Any, record: dict[str, Any]) -> None:
        parent = multiprocessing.parent_process()
        if _interrupted or self.stop.is_set() or (parent is not None and not parent.is_alive()):
            trainer.should_stop = True


def _stop_at_the_next_step_on_ctrl_c() -> None:
    """The first SIGINT only raises the flag :class:`StopWhenAsked` reads; the second interrupts as usual."""

    def first_interrupt(signum: int, frame: Any) -> None:
        global _interrupted
        _interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, first_interrupt)


def check_picklable(callbacks: CallbackFactory) -> None:
    """Side-by-side runs build their callbacks in their own process: refuse a factory that cannot get there."""
    import __main__

    problem = None
    try:
        pickle.dumps(callbacks)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        problem = str(error)
    module = getattr(callbacks, "__module__", None) or type(callbacks).__module__
    main_spec = getattr(__main__, "__spec__", None)
    if problem is None and module == "__main__" and not hasattr(__main__, "__file__"):
        problem = "it is defined in an interactive session, which a spawned process cannot import"
    elif problem is None and module == "__main__" and main_spec is not None and main_spec.name.endswith("__main__"):
        problem = f"it is defined in {main_spec.name}, which a spawned process does not import"
    if problem is not None:
        raise ValueError(
            f"the callbacks factory {callbacks!r} cannot be sent to the runs' processes ({problem}); pass a "
            "module-level function or class of an importable module, or train one run at a time "
            "(ComparePlan parallel_runs=1)"
        )


@dataclasses.dataclass(frozen=True)
class _Work:
    """What every run's process is handed besides its spec and place (pickled)."""

    train: TrainOne
    callbacks: CallbackFactory
    level: int  # the parent's logging level: the run sends records from there on
    stop: Any  # an Event shared by every run: set, each run stops after its current step


@dataclasses.dataclass
class _Running:
    index: int
    spec: RunSpec
    slot: int
    process: BaseProcess
    channel: Connection  # what the run sends: log records and bar figures, then its result
    started: float
    final: tuple | None = None  # ("done", outcome) or ("failed", error, traceback text)
    hung_up: bool = False  # the pipe ended without a result: the process died
    console: RunConsole = dataclasses.field(default_factory=RunConsole)  # its log records and bars, shown here

    @property
    def over(self) -> bool:
        return self.final is not None or self.hung_up


def train_side_by_side(
    specs: Sequence[RunSpec],
    train: TrainOne,
    at_once: int,
    callbacks: CallbackFactory,
    *,
    is_finished: Callable[[RunSpec], bool],
    on_run_end: RunEnded,
) -> list[Any]:
    """Train ``specs`` ``at_once`` at a time, each with ``train`` in a fresh process; finished runs are handed to
    ``train`` in this process (it skips them). Returns the outcomes in the plan's order."""
    context = multiprocessing.get_context("spawn")
    work = _Work(train, callbacks, logging.getLogger().getEffectiveLevel(), context.Event())
    waiting = list(enumerate(specs, 1))
    free_slots = list(range(at_once))
    running: list[_Running] = []
    outcomes: dict[int, Any] = {}
    with log_lines_above_the_bars():
        try:
            while waiting or running:
                while waiting and free_slots:
                    index, spec = waiting.pop(0)
                    if is_finished(spec):
                        outcomes[index] = train(spec)
                        on_run_end(outcomes[index], 0.0, len(waiting) + len(running))
                        continue
                    running.append(_start(context, work, spec, RunPlace(index, len(specs), free_slots.pop(0))))
                if not running:
                    continue
                wait([run.channel for run in running] + [run.process.sentinel for run in running])
                for run in list(running):
                    _receive(run)
                    if not run.over:
                        continue
                    running.remove(run)
                    outcomes[run.index] = _result(run)  # a failed run's error is raised here
                    free_slots = sorted([*free_slots, run.slot])
                    left = len(running) + sum(not is_finished(spec) for _, spec in waiting)
                    on_run_end(outcomes[run.index], time.monotonic() - run.started, left)
        except BaseException as error:
            work.stop.set()
            with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C while they stop must not hide the first
                _wait_until_stopped(running, type(error).__name__)
            raise
    return [outcomes[index] for index in sorted(outcomes)]


def _wait_until_stopped(running: Sequence[_Running], why: str, limit_s: float = 300.0) -> None:
    """Wait for the runs still training to stop at their next step, showing what they send meanwhile; a run stuck
    past ``limit_s`` is terminated (its last checkpoint stays: checkpoints are written atomically)."""
    still = [run for run in running if not run.over]
    if still:
        names = ", ".join(run.spec.name for run in still)
        logger.error("compare: stopping %s at their next step (%s); a rerun resumes them from there", names, why)
    deadline = time.monotonic() + limit_s
    while (pending := [run for run in running if not run.over]) and time.monotonic() < deadline:
        waitables = [run.channel for run in pending] + [run.process.sentinel for run in pending]
        wait(waitables, timeout=max(0.0, deadline - time.monotonic()))
        for run in pending:
            _receive(run)
    for run in running:
        if run.final is not None and run.final[0] == "failed" and not isinstance(run.final[1], KeyboardInterrupt):
            logger.error("compare: %s failed too: %s", run.spec.name, run.final[1])
        run.process.join(max(0.0, deadline - time.monotonic()))
        if run.process.is_alive():
            logger.warning("compare: %s did not stop within %.0f s; terminating it", run.spec.name, limit_s)
            run.process.terminate()
            run.process.join()
        run.console.close()


def _start(context: Any, work: _Work, spec: RunSpec, place: RunPlace) -> _Running:
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_run_in_process, args=(send, work, spec, place), name=f"compare-{spec.name}")
    process.start()
    send.close()  # the child holds the sending end; the parent sees end-of-file if the child dies
    return _Running(place.index, spec, place.slot, process, receive, time.monotonic())


def _receive(run: _Running, most: int = 1000) -> None:
    """Handle up to ``most`` of the messages ``run`` has sent (so a chatty run cannot starve the others): its log
    records and bar figures are shown here, its result kept. A message that cannot be shown is reported, not
    raised: it must not end the comparison."""
    for _ in range(most):
        if run.over or not run.channel.poll():
            break
        try:
            message = run.channel.recv()
        except (EOFError, OSError):  # the process ended without a result
            run.hung_up = True
            return
        except Exception as error:  # a message that does not unpickle here
            logger.warning("compare: a message from %s could not be read: %r", run.spec.name, error)
            continue
        if message[0] in ("done", "failed"):
            run.final = message
            continue
        try:
            run.console.show(message)
        except Exception as error:
            logger.warning("compare: could not show a message from %s: %r", run.spec.name, error)
    if not run.over and not run.process.is_alive() and not run.channel.poll():
        run.hung_up = True  # dead, all it sent read, yet no end of file: a process it started holds the pipe


def _result(run: _Running) -> Any:
    """The run's outcome, or its error raised here (the error object the run raised, if it could travel)."""
    run.process.join()
    run.console.close()
    if run.final is None:
        code = run.process.exitcode
        if code == -signal.SIGKILL:
            how = "was killed (signal 9: out of memory?)"
            hint = "or train fewer runs at a time (--set parallel_runs=N) to use less memory"
        else:
            how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            hint = "after reading its error above, or train one run at a time with --set parallel_runs=1"
        raise RunProcessError(
            f"the process training {run.spec.name} {how} before it finished; the runs beside it stop at their "
            f"next step. Rerun the command to resume every run, {hint}"
        )
    if run.final[0] == "failed":
        error, text = run.final[1], run.final[2]
        if not isinstance(error, KeyboardInterrupt):
            logger.error("compare: %s failed: %s", run.spec.name, error)
            error.add_note(f"raised while training {run.spec.name}, in its process:\n{text.rstrip()}")
        raise error
    return run.final[1]


def _run_in_process(connection: Connection, work: _Work, spec: RunSpec, place: RunPlace) -> None:
    """A run's process: logs and bars go to the parent; flushed denormals; the shared stop."""
    from switchformer.training.denormals import flushed_denormals

    _stop_at_the_next_step_on_ctrl_c()
    parent = ToParent(connection)
    forward_logs(parent, work.level)
    try:
        if work.stop.is_set():  # the comparison stopped while this process started: do not begin
            return
        with flushed_denormals():  # before the run starts torch's thread pool, as the command line does
            own = bars_drawn_by(functools.partial(BarInParent, parent), work.callbacks(spec, place))
            outcome = work.train(spec, callbacks=[*own, StopWhenAsked(work.stop)])
        if _interrupted:
            raise KeyboardInterrupt  # stopped at a checkpoint by Ctrl-C: the parent reports the interruption
        parent.send(("done", outcome))
    except BaseException as error:  # KeyboardInterrupt included: the parent re-raises it
        text = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:
            error = RuntimeError(f"{type(error).__name__}: {error}")
        parent.send(("failed", error, text))
    finally:
        parent.close()

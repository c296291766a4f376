"""One terminal for runs trained in other processes: the runs' log records and progress bars go through the parent.

Each run sends them over its own pipe (:class:`ToParent`); the parent emits the records through its own loggers
and handlers (so a library user's handlers see them) and draws the bars (:class:`RunConsole`), one line per slot,
printing log lines above them rather than into them (:func:`log_lines_above_the_bars`). What a run writes to stderr
itself, such as Python warnings or the messages of torch's own loggers, still goes straight to the terminal.

Messages on a run's pipe: ``("log", record)``, ``("bar", bar_id, action, payload)`` and, last, the run's result
(``("done", outcome)`` or ``("failed", error, traceback_text)``, read by :mod:`.side_by_side`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from logging.handlers import QueueHandler
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from switchformer.training.callbacks import Callback, ProgressBar

if TYPE_CHECKING:
    from switchformer.training.trainer import Trainer

BarFactory = Callable[..., Any]  # tqdm's keyword arguments in; an object with update, set_postfix and close out


# -- in a run's process ------------------------------------------------------------------------------------------


class ToParent:
    """A run's end of its pipe. Sends whole messages one at a time (any thread of the run may log), and serves as
    the queue of a :class:`logging.handlers.QueueHandler`, which makes records safe to pickle."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.lock = threading.RLock()  # a record logged while a message is being pickled must not deadlock
        self.parent_gone = False

    def send(self, message: tuple) -> None:
        """Send, or drop the message once the parent is gone: the run must still reach its next step's check
        (``StopWhenAsked``) and stop there with a checkpoint rather than die on a broken pipe."""
        with self.lock:
            if self.parent_gone:
                return
            try:
                self.connection.send(message)
            except OSError:  # BrokenPipeError and kin: nobody reads this pipe any more
                self.parent_gone = True

    def close(self) -> None:
        with self.lock:
            self.connection.close()

    def put_nowait(self, record: logging.LogRecord) -> None:
        self.send(("log", record))


def forward_logs(parent: ToParent, level: int) -> None:
    """Send this process's log records, from ``level`` on, to the parent instead of any handler here."""
    root = logging.getLogger()
    root.handlers = [QueueHandler(parent)]  # type: ignore[arg-type]  # a queue in all that QueueHandler uses
    root.setLevel(level)


class BarInParent:
    """What :class:`ProgressBar` uses of a tqdm bar, drawn by the parent process. Figures travel at most every
    ``interval`` seconds: a tiny model's steps take milliseconds."""

    _ids = itertools.count()

    def __init__(self, channel: ToParent, interval: float = 0.1, **tqdm_kwargs: Any) -> None:
        self.channel, self.interval = channel, interval
        self.id = next(self._ids)
        self.steps, self.postfix, self.sent_at = 0, None, time.monotonic()
        channel.send(("bar", self.id, "open", tqdm_kwargs))

    def set_postfix(self, postfix: dict[str, Any], refresh: bool = True) -> None:
        self.postfix = dict(postfix)

    def update(self, steps: int = 1) -> None:
        self.steps += steps
        if time.monotonic() - self.sent_at >= self.interval:
            self._send()

    def _send(self) -> None:
        self.channel.send(("bar", self.id, "update", (self.steps, self.postfix)))
        self.steps, self.sent_at = 0, time.monotonic()

    def close(self) -> None:
        self._send()
        self.channel.send(("bar", self.id, "close", None))


def bars_drawn_by(make_bar: BarFactory, callbacks: Sequence[Callback]) -> list[Callback]:
    """``callbacks`` with every :class:`ProgressBar` drawing its bar with ``make_bar`` instead of tqdm."""
    return [_DrawnBy(c, make_bar) if isinstance(c, ProgressBar) else c for c in callbacks]


class _DrawnBy(Callback):
    """Stands in for a :class:`ProgressBar`: its bar is made by ``make_bar``, with the arguments ProgressBar gives
    tqdm; every figure after that is the progress bar's own."""

    def __init__(self, progress: ProgressBar, make_bar: BarFactory) -> None:
        self.progress, self.make_bar = progress, make_bar

    def on_train_start(self, trainer: Trainer) -> None:
        steps, kwargs = trainer.config.steps, self.progress.tqdm_kwargs
        self.progress.bar = self.make_bar(total=steps, initial=trainer.step, unit="step", dynamic_ncols=True, **kwargs)

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.progress.on_step_end(trainer, record)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.progress.on_log(trainer, record)

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self.progress.on_train_end(trainer, summary)


# -- in the parent ------------------------------------------------------------------------------------------------


class RunConsole:
    """Shows what one run sends: its log records through this process's loggers, its bars drawn here."""

    def __init__(self) -> None:
        self.bars: dict[int, Any] = {}

    def show(self, message: tuple) -> None:
        if message[0] == "log":
            record = message[1]
            emitter = logging.getLogger(record.name)
            if emitter.isEnabledFor(record.levelno):  # this process's levels, which may be finer than the run's
                emitter.handle(record)
        else:
            self._draw(*message[1:])

    def _draw(self, bar_id: int, action: str, payload: Any) -> None:
        if action == "open":
            self.bars[bar_id] = tqdm(**payload)
            return
        bar = self.bars.get(bar_id)
        if bar is None:  # closed already (tqdm allows closing twice)
            return
        if action == "update":
            steps, postfix = payload
            if postfix:
                bar.set_postfix(postfix, refresh=False)
            bar.update(steps)
        else:
            _close_bar(self.bars.pop(bar_id))

    def close(self) -> None:
        """Close what the run left open (it failed or was stopped), so its slot's line is free."""
        for bar in self.bars.values():
            _close_bar(bar)
        self.bars.clear()


def _close_bar(bar: Any) -> None:
    """Close a bar and put the cursor back at the start of the line: tqdm clears a bar below the first line and
    moves back up, but leaves the cursor at the end of that cleared line, where the next log line would begin."""
    bar.close()
    stream = getattr(bar, "fp", None)
    if stream is not None and not bar.leave:
        stream.write("\r")


class _AboveTheBars(logging.Handler):
    """Stands in for a console handler while bars are drawn: the same level, filters and format, written with
    ``tqdm.write``, which lifts the bars off the line first and draws them again below."""

    def __init__(self, console: logging.StreamHandler) -> None:
        super().__init__(console.level)
        self.stream = console.stream
        self.filters = list(console.filters)
        self.setFormatter(console.formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def log_lines_above_the_bars() -> Iterator[None]:
    """While bars are drawn here, the root logger's console handlers (to stdout or stderr) write through tqdm;
    every other handler is left as it is, and nothing is added where there is none."""
    root = logging.getLogger()
    saved = list(root.handlers)

    def is_console(handler: logging.Handler) -> bool:
        return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)

    root.handlers = [_AboveTheBars(h) if is_console(h) else h for h in saved]  # type: ignore[arg-type]
    try:
        yield
    finally:
        root.handlers = saved

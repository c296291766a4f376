"""Fine-tuning callbacks, one concern each: exact match at every evaluation, early stopping, the best checkpoint.

The trainer hands every callback the same step record, so :class:`ExactMatchEvaluator` (listed first) adds
``exact_match`` to it and the others read it. Each evaluation is appended to ``RUN/eval.jsonl``; after a resume
the early-stopping and best-checkpoint state is replayed from that log, so a resumed run stops where an
uninterrupted one would. Under torchrun the evaluator and early stopping run on every rank (each model replica
decodes its share of the examples; all ranks see the same figures and stop at the same step); files are the main
rank's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from switchformer.data.tokenizer import SwitchTokenizer
from switchformer.finetune.batches import Example
from switchformer.finetune.config import Metric
from switchformer.finetune.evaluation import exact_match
from switchformer.run_folder import atomic_directory, atomic_write_text
from switchformer.training.callbacks import Callback

if TYPE_CHECKING:
    from switchformer.training.trainer import Trainer

logger = logging.getLogger(__name__)

EVAL_LOG = "eval.jsonl"
BEST_DIR = "best"
BEST_INFO = "best.json"


def read_eval_log(run_dir: Path) -> list[dict[str, Any]]:
    """The evaluations of a fine-tuning run, oldest first (step 0 is the baseline before training)."""
    path = Path(run_dir) / EVAL_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_eval_log(run_dir: Path, records: Sequence[dict[str, Any]]) -> None:
    """Replace the log atomically: other ranks may be replaying it while a resumed main rank trims it."""
    atomic_write_text(run_dir / EVAL_LOG, "".join(json.dumps(r) + "\n" for r in records))


class ExactMatchEvaluator(Callback):
    """At each evaluation (a step whose record has ``val_loss``), greedy-decode the validation inputs and add
    ``exact_match`` to the record; with ``baseline`` also measure the model once before the first step."""

    every_rank = True  # the validation loss is a collective, and early stopping on every rank reads exact match

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: SwitchTokenizer,
        *,
        batch_size: int,
        max_new_tokens: int,
        baseline: bool = True,
    ) -> None:
        self.examples, self.tokenizer = list(examples), tokenizer
        self.batch_size, self.max_new_tokens, self.baseline = batch_size, max_new_tokens, baseline

    def measure(self, trainer: Trainer) -> float:
        """The share of all examples decoded exactly; each model replica decodes every ``replicas``-th one.

        Under expert parallelism the ranks of one replica hold its experts between them, so they decode the same
        examples in lockstep (same batches, same all-to-alls) and stop only when all of them are done (a rounding
        difference could end one rank's batch a step earlier); the sum over all ranks then counts every example
        once per rank of a replica, in ``correct`` and ``total`` alike.
        """
        strategy = trainer.strategy
        share = self.examples[strategy.replica :: strategy.replicas]
        result = exact_match(
            trainer.model,
            share,
            self.tokenizer,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            device=trainer.device,
            stop_together=strategy.agree_to_stop,
        )
        correct, total = strategy.sum([float(result.correct), float(result.total)])
        return correct / max(total, 1.0)

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.strategy.is_main:
            kept = [r for r in read_eval_log(trainer.run_dir) if r["step"] <= trainer.step] if trainer.step else []
            _write_eval_log(trainer.run_dir, kept)  # a resume forgets evaluations after its checkpoint
        if self.baseline and trainer.step == 0:
            record = {"step": 0, **trainer.evaluate(), "exact_match": self.measure(trainer)}
            self._append(trainer, record)

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if "val_loss" not in record:
            return
        record["exact_match"] = self.measure(trainer)
        self._append(trainer, {k: record[k] for k in ("step", "val_loss", "val_perplexity", "exact_match")})

    def _append(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if not trainer.strategy.is_main:
            return
        with (trainer.run_dir / EVAL_LOG).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info(
            "step %d: val_loss %.4f, exact match %.1f%%",
            record["step"],
            record["val_loss"],
            100 * record["exact_match"],
        )


@dataclasses.dataclass
class BestTracker:
    """The best evaluation so far by ``metric`` and how many evaluations have passed without beating it.

    Exact match moves in coarse steps on a small validation set (and often sits at 0 early in fine-tuning), so
    an equal exact match with a lower validation loss also counts as an improvement.
    """

    metric: Metric
    min_delta: float = 0.0
    best: float | None = None
    best_loss: float | None = None
    best_step: int | None = None
    since_best: int = 0

    def update(self, record: dict[str, Any]) -> bool:
        """Record one evaluation (a record with the metric and ``val_loss``); True when it is a new best."""
        value, loss = float(record[self.metric.value]), float(record["val_loss"])
        if self.best is None or self.best_loss is None:
            improved = True
        elif self.metric.higher_is_better:
            improved = value > self.best + self.min_delta or (value == self.best and loss < self.best_loss)
        else:
            improved = value < self.best - self.min_delta
        if improved:
            self.best, self.best_loss, self.best_step, self.since_best = value, loss, record["step"], 0
        else:
            self.since_best += 1
        return improved

    def replay(self, run_dir: Path, until_step: int) -> None:
        """Rebuild the state from the evaluations of steps ``1 .. until_step`` (a resumed run)."""
        for record in read_eval_log(run_dir):
            if 0 < record["step"] <= until_step and self.metric.value in record:
                self.update(record)


class EarlyStopping(Callback):
    """Stop once ``patience`` evaluations in a row have not improved ``metric`` (sets ``trainer.should_stop``)."""

    every_rank = True  # every rank must stop after the same step

    def __init__(self, metric: Metric, *, patience: int, min_delta: float = 0.0) -> None:
        self.tracker = BestTracker(metric, min_delta)
        self.patience = patience
        self.stopped_at: int | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.tracker.replay(trainer.run_dir, trainer.step)

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        name = self.tracker.metric.value
        if name not in record:
            return
        self.tracker.update(record)
        if self.tracker.since_best >= self.patience:
            self.stopped_at = record["step"]
            trainer.should_stop = True
            logger.info(
                "early stopping at step %d: %s has not improved for %d evaluations (best %.4f at step %s)",
                record["step"],
                name,
                self.patience,
                self.tracker.best,
                self.tracker.best_step,
            )


class BestCheckpoint(Callback):
    """Keep the model of the best evaluation in ``RUN/best/`` (a ``save_pretrained`` folder with the tokenizer and
    ``best.json``), independent of the rolling training checkpoints. The folder is replaced atomically."""

    every_rank = True  # every rank tracks the best evaluation (and can report it); the main rank saves it

    def __init__(self, metric: Metric, *, min_delta: float = 0.0, tokenizer_file: Path | None = None) -> None:
        self.tracker = BestTracker(metric, min_delta)
        self.tokenizer_file = tokenizer_file

    def on_train_start(self, trainer: Trainer) -> None:
        self.tracker.replay(trainer.run_dir, trainer.step)
        info = trainer.run_dir / BEST_DIR / BEST_INFO
        if not trainer.strategy.is_main:
            return
        if info.is_file() and json.loads(info.read_text())["step"] != self.tracker.best_step:
            shutil.rmtree(trainer.run_dir / BEST_DIR)  # saved after the checkpoint we resumed from
            logger.info("removed %s: it came from steps after the resumed checkpoint", trainer.run_dir / BEST_DIR)

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        name = self.tracker.metric.value
        if name in record and self.tracker.update(record):
            state = trainer.strategy.full_model_state(trainer.model)  # every rank: gathers sharded experts
            if trainer.strategy.is_main:
                self.save(trainer, record, state)

    def save(self, trainer: Trainer, record: dict[str, Any], state: dict[str, Any] | None = None) -> Path:
        from switchformer.interop.checkpoint_io import save_pretrained

        final = trainer.run_dir / BEST_DIR
        with atomic_directory(final) as tmp:
            save_pretrained(trainer.model, tmp, state_dict=state)
            if self.tokenizer_file is not None:
                shutil.copyfile(self.tokenizer_file, tmp / "tokenizer.json")
            figures = {k: record[k] for k in ("val_loss", "val_perplexity", "exact_match") if k in record}
            info = {"step": record["step"], "metric": self.tracker.metric.value, **figures}
            (tmp / BEST_INFO).write_text(json.dumps(info, indent=2) + "\n")
        logger.info(
            "new best %s %.4f at step %d: saved %s", self.tracker.metric.value, self.tracker.best, record["step"], final
        )
        return final

"""Trainer callbacks: each one concern (progress bar, collapse warnings); the trainer calls them in order."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from switchformer.training.trainer import Trainer

logger = logging.getLogger(__name__)


class Callback:
    """Hooks the trainer calls in list order. Under torchrun only the main rank gets a callback, unless it sets
    ``every_rank``: one that takes part in collectives (an evaluation) or decides for all ranks (stopping early)
    must run everywhere, on the same records, and write files only where ``trainer.strategy.is_main``."""

    every_rank: ClassVar[bool] = False

    def on_train_start(self, trainer: Trainer) -> None:
        """Called once before the first step (after a resume, before the first new step)."""

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Called after each optimizer step with that step's figures."""

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Called with each record written to metrics.jsonl (with routing diagnostics, and val_loss if evaluated)."""

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """Called once after the last step."""


class ProgressBar(Callback):
    """A tqdm bar with loss, tokens/s, learning rate, and for a sparse model the balance loss, the expert load
    (the busiest expert's tokens over an even share, in the worst layer, over the last logging interval) and the
    dropped fraction; with ETA."""

    # Makes the bars of this process (tqdm's keyword arguments in, an object with tqdm's update, set_postfix and
    # close out); None = tqdm. A comparison's side-by-side run sets one that has its parent process draw them.
    make_bar: ClassVar[Callable[..., Any] | None] = None

    def __init__(self, **tqdm_kwargs: Any) -> None:
        self.bar: Any = None
        self.tqdm_kwargs = tqdm_kwargs
        self.max_load: float | None = None  # from the last logged record's routing statistics

    def on_train_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        make = ProgressBar.make_bar or tqdm
        self.bar = make(
            total=trainer.config.steps, initial=trainer.step, unit="step", dynamic_ncols=True, **self.tqdm_kwargs
        )

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        postfix = {
            "loss": f"{record['loss']:.3f}",
            "tok/s": f"{record['tokens_per_second']:.0f}",
            "lr": f"{record['lr']:.2e}",
        }
        if trainer.model_config.moe is not None:
            postfix["lb"] = f"{record['load_balancing_loss']:.3f}"
            if self.max_load is not None:
                postfix["load"] = f"{self.max_load:.2f}x"
            postfix["drop"] = f"{record['dropped_fraction']:.1%}"
        if "val_loss" in record:
            postfix["val"] = f"{record['val_loss']:.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        layers = record.get("routing", {}).values()
        if layers:
            self.max_load = max(stats["max_load_ratio"] for stats in layers)

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()


class CollapseWarning(Callback):
    """Warn when one expert takes most of a layer's tokens for many steps in a row (router collapse)."""

    def __init__(self, share: float, steps: int) -> None:
        self.share, self.steps = share, steps
        self.streak: dict[str, int] = {}
        self.warned: set[str] = set()

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        interval = trainer.config.log_every
        for layer, stats in record.get("routing", {}).items():
            load = stats["load"]
            busiest = max(range(len(load)), key=load.__getitem__)
            # "Most of the tokens" beyond an expert's fair share: with 2 experts 57% is normal, 80% is not.
            threshold = self.share + (1 - self.share) / len(load)
            if load[busiest] >= threshold:
                self.streak[layer] = self.streak.get(layer, 0) + interval
            else:
                self.streak[layer] = 0
            if self.streak[layer] >= self.steps and layer not in self.warned:
                self.warned.add(layer)
                logger.warning(
                    "router collapse in %s: expert %d has taken %.0f%% of the tokens for %d steps; "
                    "consider a larger load_balancing_loss_coef, router jitter or a smaller init scale",
                    layer,
                    busiest,
                    100 * load[busiest],
                    self.streak[layer],
                )

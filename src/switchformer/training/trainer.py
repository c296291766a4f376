"""The training loop: micro-batched steps with batch-split-invariant losses, evaluation, checkpoints, metrics.

The loop is thin; progress, warnings and plots are callbacks or separate modules. Loss accounting does not
depend on how the global batch is split: each micro-batch contributes its cross-entropy *sum* divided by the
label count of the whole global batch, and its auxiliary losses divided by the number of micro-batches, so one
batch and its micro-batches give the same loss and gradients (with routing groups that do not straddle
micro-batch boundaries, e.g. ``grouping='sequence'`` or a ``group_size`` dividing the micro-batch).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from switchformer import __version__
from switchformer.models.base import SwitchModelBase
from switchformer.models.config import ModelConfig
from switchformer.models.factory import build_model
from switchformer.training.callbacks import Callback, CollapseWarning
from switchformer.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from switchformer.training.config import NonFinitePolicy, Precision, TrainConfig
from switchformer.training.diagnostics import first_non_finite_module, last_non_finite_gradient
from switchformer.training.evaluation import evaluate_model, model_forward
from switchformer.training.metrics import MetricsWriter, RoutingAccumulator
from switchformer.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    """A resumable, endless iterator of training batches (``switchformer.data`` provides one)."""

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteLossError(RuntimeError):
    """The loss or a gradient became NaN/inf; the message names the first affected parameter."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """bf16 autocast dtype, or None for float32. ``auto`` picks bf16 on CUDA only."""
    if precision is Precision.BF16 or (precision is Precision.AUTO and device.type == "cuda"):
        return torch.bfloat16
    return None


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    size = next(iter(batch.values())).shape[0]
    if size % parts:
        raise ValueError(
            f"batch_size={size} is not divisible by micro_batches={parts}; pick a divisor of the batch size"
        )
    return [
        dict(zip(batch, chunk, strict=True)) for chunk in zip(*(v.chunk(parts) for v in batch.values()), strict=True)
    ]


def count_tokens(batch: Batch) -> int:
    """Tokens a step processes: real input tokens, plus target tokens for an encoder-decoder batch."""
    inputs = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    if "labels" in batch and batch["labels"].shape != batch["input_ids"].shape:
        inputs += int((batch["labels"] != -100).sum())
    return inputs


class Trainer:
    """Trains ``model_config`` on ``train_batches``, evaluating on ``validation``, in ``run_dir``."""

    def __init__(
        self,
        model_config: ModelConfig,
        config: TrainConfig,
        *,
        train_batches: BatchSource,
        validation: list[Batch],
        run_dir: Path | str,
        extra_config: dict[str, Any] | None = None,
        callbacks: Iterable[Callback] = (),
        resume: bool = False,
        model: SwitchModelBase | None = None,
        tensorboard: bool = True,
        checkpoint_files: dict[str, Path] | None = None,
    ) -> None:
        self.model_config, self.config = model_config, config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.train_batches, self.validation = train_batches, validation
        self.extra_config = extra_config or {}
        self.checkpoint_files = checkpoint_files or {}
        self.callbacks = [*callbacks, CollapseWarning(config.collapse_warning_share, config.collapse_warning_steps)]
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        torch.manual_seed(config.seed)
        self.model = (model if model is not None else build_model(model_config)).to(self.device)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.step = 0
        self.skipped_in_a_row = 0
        self.elapsed = 0.0
        self.tokens_seen = 0
        self.last_checkpoint: Path | None = None
        self.should_stop = False  # a callback (e.g. early stopping) sets this to end training after the step
        resume_step = self._resume() if resume else None
        self.metrics = MetricsWriter(self.run_dir, resume_step=resume_step, tensorboard=tensorboard)
        self.routing = RoutingAccumulator()

    # -- checkpoints --------------------------------------------------------------------------------
    def config_payload(self) -> dict[str, Any]:
        return {
            "format": "switchformer",
            "version": __version__,
            "model": self.model_config.to_dict(),
            "train": self.config.to_dict(),
            **self.extra_config,
        }

    def save(self) -> Path:
        state = {
            "step": self.step,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data_state": json.dumps(self.train_batches.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "elapsed_seconds": self.elapsed,
            "tokens_seen": self.tokens_seen,
        }
        self.last_checkpoint = save_checkpoint(
            self.checkpoint_dir,
            self.step,
            model_state=self.model.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            trainer_state=state,
            config=self.config_payload(),
            keep=self.config.keep_checkpoints,
            extra_files=self.checkpoint_files,
        )
        return self.last_checkpoint

    def _resume(self) -> int | None:
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            logger.info("--resume: no checkpoint in %s yet, starting from step 0", self.checkpoint_dir)
            return None
        checkpoint = load_checkpoint(path)
        load_model_state(self.model, checkpoint.model_state, source=path)
        if checkpoint.optimizer_state is not None:
            self.optimizer.load_state_dict(checkpoint.optimizer_state)
        state = checkpoint.trainer_state
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.train_batches.load_state_dict(json.loads(state["data_state"]))
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed_seconds"])
        self.tokens_seen = int(state["tokens_seen"])
        self.last_checkpoint = path
        logger.info("resumed from %s at step %d", path, self.step)
        return self.step

    # -- steps --------------------------------------------------------------------------------------
    def _forward(self, batch: Batch):
        return model_forward(self.model, batch, self.device, self.amp_dtype)

    def train_step(self, batch: Batch) -> dict[str, Any]:
        """One optimizer update over ``batch`` split into ``micro_batches``; returns the step's figures."""
        figures = self.accumulate_gradients(batch)
        max_norm = self.config.clip_grad_norm if self.config.clip_grad_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        figures["lr"] = self.optimizer.param_groups[0]["lr"]
        figures["grad_norm"] = grad_norm
        if not (math.isfinite(figures["loss"]) and math.isfinite(grad_norm)):
            self._handle_non_finite(figures["loss"], grad_norm, batch)
        else:
            self.optimizer.step()
            self.scheduler.step()
            self.skipped_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        return figures

    def accumulate_gradients(self, batch: Batch) -> dict[str, float]:
        """Backward over the micro-batches of ``batch``, leaving the global batch's gradient in ``.grad``."""
        self.model.train()
        micro = split_batch(batch, self.config.micro_batches)
        total_labels = int((batch["labels"] != -100).sum())
        sums = {"ce_loss": 0.0, "aux_loss": 0.0, "load_balancing_loss": 0.0, "z_loss": 0.0}
        dropped, layers = 0.0, 0
        for part in micro:
            out = self._forward(part)
            ce = out.ce_loss * (out.num_label_tokens / max(total_labels, 1))
            aux = out.aux_loss / len(micro)
            (ce + aux).backward()
            sums["ce_loss"] += float(ce.detach())
            sums["aux_loss"] += float(aux.detach())
            sums["load_balancing_loss"] += float(out.load_balancing_loss.detach()) / len(micro)
            sums["z_loss"] += float(out.z_loss.detach()) / len(micro)
            self.routing.add(out.router)
            dropped += sum(float(r.stats.dropped_fraction) for r in out.router)
            layers += len(out.router)
        return {"loss": sums["ce_loss"] + sums["aux_loss"], **sums, "dropped_fraction": dropped / max(layers, 1)}

    def _handle_non_finite(self, loss: float, grad_norm: float, batch: Batch) -> None:
        first_micro = split_batch(batch, self.config.micro_batches)[0]
        module = first_non_finite_module(self.model, lambda: self._forward(first_micro))
        if module is not None:
            where = f"first non-finite output in layer {module}"
        else:
            where = f"forward pass finite; non-finite gradient reaching {last_non_finite_gradient(self.model)}"
        message = (
            f"non-finite values at step {self.step + 1}: loss={loss}, grad_norm={grad_norm}; {where}. Lower the "
            "learning rate, keep gradient clipping on, train in fp32, or resume from the last checkpoint"
        )
        if self.config.non_finite is NonFinitePolicy.STOP:
            raise NonFiniteLossError(message)
        self.skipped_in_a_row += 1
        logger.warning("skipping the update: %s", message)
        if self.skipped_in_a_row >= self.config.max_skipped_steps:
            raise NonFiniteLossError(f"{self.skipped_in_a_row} steps in a row were skipped; last: {message}")

    def evaluate(self, batches: list[Batch] | None = None) -> dict[str, float]:
        """Validation cross-entropy and perplexity, in eval mode (so the eval capacity factor applies)."""
        batches = self.validation if batches is None else batches
        if self.config.eval_batches is not None:
            batches = batches[: self.config.eval_batches]
        result = evaluate_model(self.model, batches, device=self.device, amp_dtype=self.amp_dtype)
        return {"val_loss": result["val_loss"], "val_perplexity": result["val_perplexity"]}

    # -- the loop -----------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        for cb in self.callbacks:
            cb.on_train_start(self)
        interval_tokens, interval_time = 0, 0.0
        record: dict[str, Any] = {}
        try:
            while self.step < self.config.steps:
                batch = next(self.train_batches)
                started = time.perf_counter()
                figures = self.train_step(batch)
                took = time.perf_counter() - started
                tokens = count_tokens(batch)
                self.step += 1
                self.elapsed += took
                self.tokens_seen += tokens
                interval_tokens += tokens
                interval_time += took
                record = {"step": self.step, **figures, "tokens_per_second": tokens / max(took, 1e-9)}
                evaluated = self.step % self.config.eval_every == 0 or self.step == self.config.steps
                if evaluated:
                    record.update(self.evaluate())
                if evaluated or self.step % self.config.log_every == 0:
                    self._log(record, interval_tokens / max(interval_time, 1e-9))
                    interval_tokens, interval_time = 0, 0.0
                for cb in self.callbacks:
                    cb.on_step_end(self, record)
                if self.should_stop or self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                    self.save()
                if self.should_stop:
                    logger.info("stopping at step %d: a callback asked to stop", self.step)
                    break
        finally:
            self.metrics.close()
        summary = {
            "steps": self.step,
            "final_loss": record.get("loss"),
            "final_val_loss": record.get("val_loss"),
            "final_val_perplexity": record.get("val_perplexity"),
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.elapsed,
            "tokens_per_second": self.tokens_seen / max(self.elapsed, 1e-9),
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for cb in self.callbacks:
            cb.on_train_end(self, summary)
        return summary

    def _log(self, record: dict[str, Any], interval_tokens_per_second: float) -> None:
        entry = dict(record)
        entry["tokens_per_second"] = interval_tokens_per_second
        entry["elapsed_seconds"] = self.elapsed
        if self.routing.count:
            entry["routing"] = self.routing.summary()
        self.routing.reset()
        self.metrics.write(entry)
        for cb in self.callbacks:
            cb.on_log(self, entry)


class CyclingBatches:
    """A resumable source cycling through a fixed list of batches (tests, tiny experiments, distillation)."""

    def __init__(self, batches: list[Batch]) -> None:
        if not batches:
            raise ValueError("CyclingBatches needs at least one batch")
        self.batches, self.position = batches, 0

    def __iter__(self) -> CyclingBatches:
        return self

    def __next__(self) -> Batch:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

"""The training loop: micro-batched steps with batch-split-invariant losses, evaluation, checkpoints, metrics.

The loop is thin; progress, warnings and plots are callbacks or separate modules. Loss accounting does not
depend on how the global batch is split: each micro-batch contributes its cross-entropy *sum* divided by the
label count of the whole global batch, and its auxiliary losses divided by the number of micro-batches, so one
batch and its micro-batches give the same loss and gradients (with routing groups that do not straddle
micro-batch boundaries, e.g. ``grouping='sequence'`` or a ``group_size`` dividing the micro-batch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from switchformer import __version__
from switchformer.errors import CheckpointError
from switchformer.host_memory import keep_freed_memory
from switchformer.labels import IGNORE_INDEX
from switchformer.models.base import SwitchModelBase
from switchformer.models.config import ModelConfig
from switchformer.models.factory import build_model
from switchformer.models.stack import set_activation_checkpointing
from switchformer.moe.router import jitter_by_row
from switchformer.run_folder import checkpoints_dir, write_summary
from switchformer.training.callbacks import Callback, CollapseWarning
from switchformer.training.checkpoint import (
    STATE_FILE,
    Checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    write_checkpoint_files,
)
from switchformer.training.compiled import compile_blocks
from switchformer.training.config import NonFinitePolicy, Precision, TrainConfig
from switchformer.training.denormals import flushed_denormals
from switchformer.training.diagnostics import first_non_finite_module, last_non_finite_gradient
from switchformer.training.evaluation import evaluate_over_ranks, model_forward
from switchformer.training.metrics import MetricsWriter, RoutingAccumulator
from switchformer.training.optim import build_optimizer, build_scheduler, optimizer_kind
from switchformer.training.strategy import SingleProcess, WeightSource

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


def local_micro_batches(batch: Batch, parts: int, strategy: SingleProcess) -> list[Batch]:
    """This process's share of each of the global batch's ``parts`` micro-batches: micro-batch ``i`` is the same
    rows as in one process, sliced over the ranks, so routing groups spanning ranks are one process's groups."""
    rows, world = next(iter(batch.values())).shape[0], strategy.world_size
    if world > 1 and rows % (parts * world):
        raise ValueError(
            f"batch_size={rows} does not split into micro_batches={parts} x {world} ranks: each rank takes an equal "
            f"slice of every micro-batch; use a batch size divisible by {parts * world}"
        )
    return [strategy.local_batch(part) for part in split_batch(batch, parts)]


def hash_key(*parts: int) -> int:
    """A 63-bit key from integers (e.g. the seed and the step), the same in every process."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def count_tokens(batch: Batch) -> int:
    """Tokens a step processes: real input tokens, plus target tokens for an encoder-decoder batch."""
    inputs = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    if "labels" in batch and batch["labels"].shape != batch["input_ids"].shape:
        inputs += int((batch["labels"] != IGNORE_INDEX).sum())
    return inputs


class Trainer:
    """Trains ``model_config`` on ``train_batches``, evaluating on ``validation``, in ``run_dir``.

    The model is ``model`` or one built from ``model_config``; on the meta device it is allocated by the strategy
    (each rank its shards) and filled by ``initial_weights`` (e.g. a checkpoint streamed block by block) or from
    ``config.seed``.
    """

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
        initial_weights: WeightSource | None = None,
        tensorboard: bool = True,
        checkpoint_files: dict[str, Path] | None = None,
        strategy: SingleProcess | None = None,
    ) -> None:
        self.model_config, self.config = model_config, config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = checkpoints_dir(self.run_dir)
        self.train_batches, self.validation = train_batches, validation
        self.extra_config = extra_config or {}
        self.checkpoint_files = checkpoint_files or {}
        self.strategy = strategy or SingleProcess()
        # Printing and file output belong to the main rank; every rank runs the same steps and collectives.
        collapse = CollapseWarning(config.collapse_warning_share, config.collapse_warning_steps)
        self.callbacks = [cb for cb in (*callbacks, collapse) if self.strategy.is_main or cb.every_rank]
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults on each step's large tensors (docs/performance.md)
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        torch.manual_seed(config.seed)
        # Built on the meta device and materialised by the strategy: only this rank's shards are ever allocated,
        # filled by initial_weights or with the weights config.seed gives in one process (in any layout).
        model = model if model is not None else build_model(model_config, device="meta")
        if config.activation_checkpointing:
            set_activation_checkpointing(model, config.activation_checkpointing)
        self.model = self.strategy.prepare_model(
            model, device=self.device, seed=config.seed, compute_dtype=self.amp_dtype, fill=initial_weights
        )
        if config.compile:
            compile_blocks(self.model, config.compile)  # after expert parallelism swapped in its dispatchers
        self.strategy.seed_ranks(config.seed)
        self.checkpointer = self.strategy.checkpointer(self.checkpoint_dir, async_save=config.async_checkpoint)
        self.optimizer = build_optimizer(self.model, config, layout=self.strategy.layout)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.step = 0
        self.skipped_in_a_row = 0
        self.elapsed = 0.0
        self.tokens_seen = 0
        self.last_checkpoint: Path | None = None
        self.should_stop = False  # a callback (e.g. early stopping) sets this to end training after the step
        resume_step = self._resume() if resume else None
        self.metrics = (
            MetricsWriter(self.run_dir, resume_step=resume_step, tensorboard=tensorboard)
            if self.strategy.is_main
            else None
        )
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

    def save(self) -> Path | None:
        """Write a checkpoint (a collective under parallelism: every rank calls it; each writes its shards and the
        main rank the rest). Returns the step folder once it is complete (None on other ranks, and while an
        asynchronous save is still being written)."""
        state = {
            "step": self.step,
            "rng_states": self.strategy.rng_states(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data_state": json.dumps(self.train_batches.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "elapsed_seconds": self.elapsed,
            "tokens_seen": self.tokens_seen,
            "optimizer": optimizer_kind(self.optimizer),  # so a resume with another optimizer is refused up front
        }
        if self.checkpointer is not None:
            config, extra = self.config_payload(), self.checkpoint_files
            saved = self.checkpointer.save(
                self.step, self.model, self.optimizer, lambda tmp: write_checkpoint_files(tmp, state, config, extra)
            )
            return self._completed(saved)
        if not self.strategy.is_main:
            return None
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

    def _completed(self, saved: Path | None) -> Path | None:
        """A sharded save that just completed becomes the last checkpoint; older ones are pruned."""
        if saved is not None:
            self.last_checkpoint = saved
            prune_checkpoints(self.checkpoint_dir, self.config.keep_checkpoints)
        return saved

    def _resume(self) -> int | None:
        """Continue from the latest complete checkpoint. Everything that can refuse it (checksums, the trainer
        state's fields, the optimizer, the model's names and shapes, the data position) is checked before anything
        is applied, so a refused checkpoint leaves the model, optimizer and data stream as they were."""
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            logger.info("--resume: no checkpoint in %s yet, starting from step 0", self.checkpoint_dir)
            return None
        try:  # a sharded run reads only the trainer state here, and each rank its own shards below
            checkpoint = load_checkpoint(path, with_weights=self.strategy.world_size == 1)
        except CheckpointError as error:
            older = [p for p in list_checkpoints(self.checkpoint_dir) if p.name < path.name]
            hint = (
                f"move {path} out of {self.checkpoint_dir} to resume from {older[-1].name}, the checkpoint before it"
                if older
                else "no older checkpoint is left to resume from"
            )
            raise CheckpointError(f"cannot resume: {error}; {hint}") from error
        state = self._read_trainer_state(checkpoint)
        self._check_optimizer_state(checkpoint)
        data_before = self.train_batches.state_dict()
        try:
            self.train_batches.load_state_dict(state["data_state"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"cannot resume from {path}: {error}") from error
        try:
            self.strategy.load_training_state(checkpoint, self.model, self.optimizer)
        except BaseException:
            self.train_batches.load_state_dict(data_before)
            raise
        self.scheduler.load_state_dict(state["scheduler"])
        self.strategy.restore_rng(state["rng_states"], seed=self.config.seed, step=state["step"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = state["step"]
        self.elapsed = state["elapsed_seconds"]
        self.tokens_seen = state["tokens_seen"]
        self.last_checkpoint = path
        logger.info("resumed from %s at step %d", path, self.step)
        return self.step

    @staticmethod
    def _read_trainer_state(checkpoint: Checkpoint) -> dict[str, Any]:
        """The trainer state's fields, parsed, or a :class:`CheckpointError` naming the one missing or garbled."""
        state = checkpoint.trainer_state
        try:
            return {
                "step": int(state["step"]),
                "rng_states": state["rng_states"],
                "cuda_rng": state["cuda_rng"],
                "data_state": json.loads(state["data_state"]),
                "scheduler": dict(state["scheduler"]),
                "elapsed_seconds": float(state["elapsed_seconds"]),
                "tokens_seen": int(state["tokens_seen"]),
            }
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"{checkpoint.path / STATE_FILE} has a missing or unreadable field ({type(error).__name__}: {error}); "
                "was it written by another switchformer version?"
            ) from error

    def _check_optimizer_state(self, checkpoint: Checkpoint) -> None:
        saved, own = checkpoint.optimizer_state, self.optimizer
        if saved is None:
            return
        own_kind = optimizer_kind(own)
        kind = checkpoint.trainer_state.get("optimizer", own_kind)
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        fits = isinstance(groups, list) and len(groups) == len(own.param_groups)
        fits = fits and all(
            isinstance(g, dict) and len(g.get("params", ())) == len(o["params"])
            for g, o in zip(groups, own.param_groups, strict=False)
        )
        if kind != own_kind or not fits:
            raise CheckpointError(
                f"the optimizer state in {checkpoint.path} ({kind}) does not fit this run's optimizer "
                f"({own_kind}, {len(own.param_groups)} parameter groups); resume with the optimizer "
                "settings the run started with"
            )

    # -- steps --------------------------------------------------------------------------------------
    def _forward(self, batch: Batch):
        return model_forward(self.model, batch, self.device, self.amp_dtype, return_logits=not self.config.chunked_loss)

    def train_step(self, batch: Batch) -> dict[str, Any]:
        """One optimizer update over ``batch`` split into ``micro_batches``; returns the step's figures."""
        figures = self.accumulate_gradients(batch)
        grad_norm = self.strategy.clip_grad_norm(self.model, self.config.clip_grad_norm)
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
        total_labels = self.model.count_labels(batch["labels"])  # of the global batch, whichever rank holds them
        micro = local_micro_batches(batch, self.config.micro_batches, self.strategy)
        # Each rank's share of the global token mean; gradient averaging over W ranks divides by W again.
        ce_scale = self.strategy.world_size / max(total_labels, 1)
        sums = {"ce_loss": 0.0, "aux_loss": 0.0, "load_balancing_loss": 0.0, "z_loss": 0.0}
        dropped, layers = 0.0, 0
        rows = next(iter(batch.values())).shape[0] // self.strategy.world_size // len(micro)
        for index, part in enumerate(micro):
            self.strategy.gradient_sync(self.model, index == len(micro) - 1)  # reduce once, after the last
            # Router jitter draws per global row: the same noise for a token whatever the layout (moe.router).
            first_row = (index * self.strategy.world_size + self.strategy.rank) * rows
            with jitter_by_row(hash_key(self.config.seed, self.step + 1), first_row), self.strategy.batch_slicing():
                out = self._forward(part)
            ce = out.ce_loss * out.num_label_tokens * ce_scale
            aux = out.aux_loss / len(micro)
            (ce + aux).backward()
            sums["ce_loss"] += float(ce.detach())
            sums["aux_loss"] += float(aux.detach())
            sums["load_balancing_loss"] += float(out.load_balancing_loss.detach()) / len(micro)
            sums["z_loss"] += float(out.z_loss.detach()) / len(micro)
            self.routing.add(out.router)
            dropped += sum(float(r.stats.dropped_fraction) for r in out.router)
            layers += len(out.router)
        sums["dropped_fraction"] = dropped / max(layers, 1)
        figures = self.strategy.mean(sums)
        return {"loss": figures["ce_loss"] + figures["aux_loss"], **figures}

    def _handle_non_finite(self, loss: float, grad_norm: float, batch: Batch) -> None:
        where = self._locate_non_finite(batch)
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

    def _locate_non_finite(self, batch: Batch) -> str:
        """Where NaN/inf first appears: the first layer output in a forward re-run of *every* micro-batch (the
        fault may be in any of them; every rank re-runs all of them, so collectives stay matched), else the
        parameter nearest the output whose gradient is non-finite. Gradients are recomputed for that: clipping by
        a non-finite norm has scaled every gradient by NaN, which would point at the model's last parameter."""
        micro = local_micro_batches(batch, self.config.micro_batches, self.strategy)
        with self.strategy.batch_slicing():
            found = [first_non_finite_module(self.model, lambda part=part: self._forward(part)) for part in micro]
        module = next((name for name in found if name is not None), None)
        if self.strategy.sum([float(module is not None)])[0] > 0:  # all ranks take the same branch
            return f"first non-finite output in layer {module or '(on another rank)'}"
        self.optimizer.zero_grad(set_to_none=True)
        rng = torch.get_rng_state()
        try:
            for part in micro:
                with self.strategy.batch_slicing():
                    out = self._forward(part)
                (out.ce_loss + out.aux_loss).backward()
        finally:
            torch.set_rng_state(rng)
        return f"forward pass finite; non-finite gradient reaching {last_non_finite_gradient(self.model)}"

    def evaluate(self, batches: list[Batch] | None = None) -> dict[str, float]:
        """Validation cross-entropy and perplexity, in eval mode (so the eval capacity factor applies)."""
        batches = self.validation if batches is None else batches
        if self.config.eval_batches is not None:
            batches = batches[: self.config.eval_batches]
        result = evaluate_over_ranks(self.model, batches, self.strategy, device=self.device, amp_dtype=self.amp_dtype)
        return {"val_loss": result["val_loss"], "val_perplexity": result["val_perplexity"]}

    # -- the loop -----------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        # Peaky softmaxes underflow to denormals, which x86 cores compute slowly; flushed while training runs.
        with flushed_denormals(enabled=self.device.type == "cpu"):
            return self._train()

    def _train(self) -> dict[str, Any]:
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
                elif self.checkpointer is not None:
                    self._completed(self.checkpointer.poll())
                if self.should_stop:
                    logger.info("stopping at step %d: a callback asked to stop", self.step)
                    break
        finally:
            if self.metrics is not None:
                self.metrics.close()
        if self.checkpointer is not None:
            self._completed(self.checkpointer.wait())
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
        if self.strategy.is_main:
            write_summary(self.run_dir, summary)
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
        if self.metrics is not None:
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

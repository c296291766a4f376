"""``pretrain()``: the library's entry point for a pre-training run, and the pieces other jobs build on.

``switchformer train`` parses its flags and calls :func:`pretrain`; comparisons and distillation train their runs
through :func:`train_prepared` (the same trainer wiring on data they prepared once), and every job that shares a
data cache between ranks prepares it with :func:`prepare_data_in_turn`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from switchformer.data import DataConfig, Objective, PreparedData, prepare_data
from switchformer.errors import CheckpointError
from switchformer.models.config import ModelConfig
from switchformer.run_folder import (
    checkpoints_dir,
    latest_run_checkpoint,
    list_checkpoints,
    read_run_config,
    write_run_config,
)
from switchformer.training.callbacks import Callback
from switchformer.training.checkpoint import verify_checkpoint
from switchformer.training.config import TrainConfig
from switchformer.training.strategy import SingleProcess
from switchformer.training.trainer import Batch, BatchSource, Trainer

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"  # copied into every checkpoint, so a checkpoint stands alone


@dataclasses.dataclass
class RunConfigs:
    """The three configs a pre-training run is made of, as its ``config.json`` and checkpoints store them."""

    model: ModelConfig
    train: TrainConfig
    data: DataConfig

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": self.train.to_dict(), "data": self.data.to_dict()}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> RunConfigs:
        return cls(
            model=ModelConfig.from_dict(payload["model"]),
            train=TrainConfig.from_dict(payload["train"]),
            data=DataConfig.from_dict(payload["data"]),
        )

    @classmethod
    def saved(cls, run_dir: Path | str) -> RunConfigs | None:
        """What ``run_dir`` was started with: its latest checkpoint's configs (checksums verified first), else its
        ``config.json``; None for a folder with neither, or whose ``config.json`` a kill cut short."""
        latest = latest_run_checkpoint(run_dir)
        if latest is not None:
            verify_checkpoint(latest)
        payload = read_run_config(run_dir)
        if payload is None:
            if (Path(run_dir) / "config.json").exists():
                logger.warning("%s/config.json is damaged and no checkpoint exists yet: starting afresh", run_dir)
            return None
        return cls.from_dict(payload)


@dataclasses.dataclass
class JobOptions:
    """What a training job hands through to its trainer unchanged."""

    callbacks: Sequence[Callback] = ()
    strategy: SingleProcess | None = None  # a DistributedStrategy under torchrun
    tensorboard: bool = True


def default_data_config(model_config: ModelConfig, **fields: Any) -> DataConfig:
    """A :class:`DataConfig` with the objective the architecture trains with (span corruption or next token)."""
    objective = Objective.SPAN_CORRUPTION if model_config.is_encoder_decoder else Objective.CAUSAL_LM
    return DataConfig(objective=objective, **fields)


def prepare_data_in_turn(data_config: DataConfig, cache_dir: Path, strategy: SingleProcess | None) -> PreparedData:
    """Prepare the data in ``cache_dir``: under torchrun the main rank first (it trains the tokenizer and fills the
    cache), then the other ranks, which read what it wrote."""
    strategy = strategy or SingleProcess()
    if not strategy.is_main:
        strategy.barrier()
    data = prepare_data(data_config, cache_dir)
    if strategy.is_main:
        strategy.barrier()
    return data


def build_trainer(
    model_config: ModelConfig,
    train_config: TrainConfig,
    run_dir: Path | str,
    *,
    train_batches: BatchSource,
    validation: list[Batch],
    resume: bool,
    options: JobOptions | None = None,
    trainer_class: type[Trainer] = Trainer,
    **trainer_arguments: Any,
) -> Trainer:
    """The one place jobs (pre-training, fine-tuning, distillation, comparisons) make their trainer.

    ``trainer_arguments`` are the :class:`Trainer`'s own optional ones (``model``, ``extra_config``,
    ``checkpoint_files``) and those of a ``trainer_class`` that extends it (distillation's teacher).
    """
    options = options or JobOptions()
    return trainer_class(
        model_config,
        train_config,
        train_batches=train_batches,
        validation=validation,
        run_dir=run_dir,
        callbacks=options.callbacks,
        resume=resume,
        tensorboard=options.tensorboard,
        strategy=options.strategy,
        **trainer_arguments,
    )


def train_prepared(
    configs: RunConfigs,
    data: PreparedData,
    run_dir: Path | str,
    *,
    resume: bool,
    options: JobOptions | None = None,
    extra_config: dict[str, Any] | None = None,
    **trainer_arguments: Any,
) -> Trainer:
    """A trainer for ``configs`` on prepared ``data`` in ``run_dir`` (not yet started: call ``.train()``).

    Its checkpoints record the data config (so a resume rebuilds the same stream) and carry the tokenizer.
    """
    tokenizer_file = Path(data.stats.cache_folder) / TOKENIZER_FILE
    return build_trainer(
        configs.model,
        configs.train,
        run_dir,
        train_batches=data.train,
        validation=data.validation,
        resume=resume,
        options=options,
        extra_config={"data": configs.data.to_dict(), **(extra_config or {})},
        checkpoint_files={TOKENIZER_FILE: tokenizer_file} if tokenizer_file.is_file() else {},
        **trainer_arguments,
    )


def pretrain(
    model_config: ModelConfig | None,
    train_config: TrainConfig | None,
    data_config: DataConfig | None,
    run_dir: Path | str,
    *,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    strategy: SingleProcess | None = None,
    tensorboard: bool = True,
    on_ready: Callable[[RunConfigs, PreparedData], None] | None = None,
) -> dict[str, Any]:
    """Pre-train ``model_config`` on ``data_config`` in ``run_dir``; returns the run's summary (also in
    ``summary.json``: steps, final losses, tokens/s, last checkpoint).

    With ``resume`` the run continues from its latest checkpoint, and a config passed as None is the one the run
    was started with (pass a ``train_config`` with more ``steps`` to extend a finished run). Without ``resume`` a
    folder that already holds checkpoints is refused. The data is prepared (tokenizer trained, corpus tokenised)
    and cached in ``run_dir``; the model's vocabulary follows the tokenizer's. Under torchrun pass the
    ``strategy`` (every rank the same arguments and ``run_dir``): the main rank prepares the data first and is the
    only one to write. ``on_ready`` is called on the main rank once the data is ready, before the first step (the
    command line prints its summary of the run there).
    """
    run_dir = Path(run_dir)
    configs = _run_configs(model_config, train_config, data_config, run_dir, resume=resume)
    if strategy is not None:
        configs.train = configs.train.replace(device=str(strategy.layout.device))
    main_rank = strategy is None or strategy.is_main
    run_dir.mkdir(parents=True, exist_ok=True)
    logger.info("preparing data (%s)", configs.data.source or "built-in corpus: standard-library sources")
    data = prepare_data_in_turn(configs.data, run_dir, strategy)
    if configs.model.vocab_size != data.tokenizer.vocab_size:
        configs.model = configs.model.replace(vocab_size=data.tokenizer.vocab_size)
    if main_rank:
        write_run_config(run_dir, configs.to_dict())
        if on_ready is not None:
            on_ready(configs, data)
    options = JobOptions(callbacks=callbacks, strategy=strategy, tensorboard=tensorboard)
    return train_prepared(configs, data, run_dir, resume=resume, options=options).train()


def _run_configs(
    model_config: ModelConfig | None,
    train_config: TrainConfig | None,
    data_config: DataConfig | None,
    run_dir: Path,
    *,
    resume: bool,
) -> RunConfigs:
    if not resume:
        if list_checkpoints(checkpoints_dir(run_dir)):
            raise ValueError(
                f"run folder {run_dir} already holds checkpoints; pass resume=True (--resume) to continue it, "
                "or choose a new run folder"
            )
        if model_config is None or train_config is None or data_config is None:
            raise ValueError("a new run needs its model, train and data configs (None means 'as saved' on resume)")
        return RunConfigs(model_config, train_config, data_config)
    saved = RunConfigs.saved(run_dir)
    if saved is None and (model_config is None or train_config is None or data_config is None):
        raise CheckpointError(
            f"cannot resume {run_dir}: it holds no checkpoint and no config.json; pass every config to start it"
        )
    return RunConfigs(
        model=model_config or saved.model,  # type: ignore[union-attr]
        train=train_config or saved.train,  # type: ignore[union-attr]
        data=data_config or saved.data,  # type: ignore[union-attr]
    )

"""``finetune()``: from a checkpoint and two JSON-lines files to a fine-tuned run folder with its best model.

The run folder is a training run folder (``checkpoints/``, ``metrics.jsonl``, ``summary.json``) plus
``eval.jsonl`` (validation loss and exact match at each evaluation, step 0 = before fine-tuning), ``best/`` (the
best model, loadable with ``from_pretrained`` and ``switchformer generate``) and ``tokenizer.json``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from switchformer.data.tokenizer import SwitchTokenizer, TokenizerNotFoundError, sentinel_token
from switchformer.finetune.batches import Example, ShuffledBatches, encode_pairs, validation_batches
from switchformer.finetune.callbacks import (
    BEST_DIR,
    BestCheckpoint,
    EarlyStopping,
    ExactMatchEvaluator,
    read_eval_log,
)
from switchformer.finetune.config import FinetuneConfig
from switchformer.finetune.model import open_for_finetuning
from switchformer.finetune.rows import BadRow, read_pairs
from switchformer.interop.checkpoint_io import load_config, resolve_checkpoint_folder
from switchformer.models.base import cast_weights
from switchformer.models.config import ModelConfig
from switchformer.models.factory import build_model
from switchformer.run_folder import latest_run_checkpoint
from switchformer.training.callbacks import Callback
from switchformer.training.config import TrainConfig
from switchformer.training.pretrain import JobOptions, build_trainer
from switchformer.training.strategy import SingleProcess

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass
class FinetuneData:
    tokenizer: SwitchTokenizer
    train: list[Example]
    validation: list[Example]
    skipped: dict[str, list[BadRow]]  # file -> bad rows left out (only with bad_rows='skip')


@dataclasses.dataclass
class FinetuneResult:
    run_dir: Path
    summary: dict[str, Any]  # the trainer's summary (steps, losses, throughput, last checkpoint)
    before: dict[str, Any] | None  # evaluation at step 0, when baseline_eval is on
    best: dict[str, Any] | None  # the evaluation whose model is in best_dir
    last: dict[str, Any] | None  # the last evaluation
    best_dir: Path | None
    stopped_early: bool
    skipped: dict[str, list[BadRow]]


def load_tokenizer(path: str | Path) -> SwitchTokenizer:
    """``tokenizer.json``, a SentencePiece ``.model`` or a folder holding one, taken as it is: sentinels are only
    added to a SentencePiece vocabulary (T5's 100, which its model's vocabulary has room for)."""
    from tokenizers import Tokenizer

    file = Path(path)
    if file.is_dir():
        found = next((f for f in (file / TOKENIZER_FILE, *sorted(file.glob("*.model"))) if f.is_file()), None)
        if found is None:
            raise ValueError(f"{file} holds no {TOKENIZER_FILE} or SentencePiece .model; pass --tokenizer PATH")
        file = found
    sentinels = 100
    if file.suffix == ".json" and file.is_file():
        backend = Tokenizer.from_file(str(file))
        sentinels = 0
        while backend.token_to_id(sentinel_token(sentinels)) is not None:
            sentinels += 1
    try:
        return SwitchTokenizer.load(file, num_sentinels=sentinels)
    except TokenizerNotFoundError as error:
        raise ValueError(str(error)) from None


def check_tokenizer(tokenizer: SwitchTokenizer, config: ModelConfig) -> None:
    """The tokenizer's ids must fit the embedding, and pad/eos must be the ids the model was trained with."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary only {config.vocab_size}; use "
            "the checkpoint's own tokenizer"
        )
    special_ids = {"pad": (tokenizer.pad_id, config.pad_token_id), "eos": (tokenizer.eos_id, config.eos_token_id)}
    for name, (ours, theirs) in special_ids.items():
        if ours != theirs:
            raise ValueError(f"the tokenizer's {name} id is {ours} but the model's {name}_token_id is {theirs}")


def prepare_finetune_data(
    train: str | Path, validation: str | Path, tokenizer: SwitchTokenizer, config: FinetuneConfig
) -> FinetuneData:
    """Read both files (bad rows per ``config.bad_rows``) and tokenise them."""
    fields = {"input_field": config.input_field, "target_field": config.target_field, "bad_rows": config.bad_rows}
    files = [read_pairs(train, **fields), read_pairs(validation, **fields)]
    skipped = {str(f.path): f.bad_rows for f in files if f.bad_rows}
    train_examples, val_examples = (encode_pairs(f.pairs, tokenizer, config) for f in files)
    return FinetuneData(tokenizer, train_examples, val_examples, skipped)


def finetune(
    checkpoint: str | Path,
    *,
    train: str | Path,
    validation: str | Path,
    run_dir: str | Path,
    config: FinetuneConfig | None = None,
    train_config: TrainConfig | None = None,
    tokenizer: str | Path | None = None,
    overrides: Iterable[str] = (),
    callbacks: Iterable[Callback] = (),
    resume: bool = False,
    tensorboard: bool = True,
    strategy: SingleProcess | None = None,
) -> FinetuneResult:
    """Fine-tune ``checkpoint`` (switchformer or Hugging Face folder, or a run folder) on ``train`` and keep the
    best model by ``config.metric`` in ``run_dir/best``; with ``resume`` continue ``run_dir`` from its last
    checkpoint (pass the configs the run started with). The tokenizer is ``tokenizer`` or the checkpoint's own.

    Under torchrun (``strategy``, every rank calling this with the same arguments and ``run_dir``) each rank trains
    on its slice of every batch (``batch_size`` must divide by the world size), holding its shards of the model
    (the strategy's layout: FSDP2 shards, a share of every layer's experts); the result is one process's up to
    rounding. Exact match is decoded in shares, one per model replica (the ranks of one replica decode theirs
    together). Only the main rank writes; every rank returns the same figures.

    ``config.dtype`` is the weights' precision while training (bf16: routers float32, the paper's selective
    precision). Safetensors checkpoints are read block by block, each rank only its shards.
    """
    config = config or FinetuneConfig()
    train_config = train_config or TrainConfig()
    strategy = strategy or SingleProcess()
    dtype = config.dtype.torch_dtype
    if strategy.world_size > 1:
        if config.batch_size % strategy.world_size:
            raise ValueError(
                f"batch_size={config.batch_size} must divide by the world size {strategy.world_size}: each rank "
                "trains on an equal slice of every batch"
            )
        train_config = train_config.replace(device=str(strategy.layout.device))
    run_dir = Path(run_dir)
    latest = latest_run_checkpoint(run_dir)
    if latest is not None and not resume:
        raise ValueError(f"run folder {run_dir} already holds checkpoints; resume it or choose a new folder")
    # A meta-device model, allocated by the strategy (each rank its shards) and filled from the checkpoint.
    if resume and latest is not None:  # the trainer's resume fills the model (each rank its shards)
        model = cast_weights(build_model(load_config(latest), device="meta"), dtype)  # with the fine-tuning dropout
        initial_weights = None
        tokenizer_source: str | Path = run_dir / TOKENIZER_FILE
    else:
        model, opened = open_for_finetuning(
            checkpoint, dropout=config.dropout, expert_dropout=config.expert_dropout, overrides=overrides, dtype=dtype
        )
        initial_weights = opened.fill
        tokenizer_source = tokenizer if tokenizer is not None else resolve_checkpoint_folder(checkpoint)
    loaded_tokenizer = load_tokenizer(tokenizer_source)
    check_tokenizer(loaded_tokenizer, model.config)
    data = prepare_finetune_data(train, validation, loaded_tokenizer, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_file = run_dir / TOKENIZER_FILE
    if strategy.is_main:
        loaded_tokenizer.save(tokenizer_file)

    collation = {"architecture": model.config.architecture, "pad_id": model.config.pad_token_id}
    source = ShuffledBatches(data.train, batch_size=config.batch_size, seed=config.shuffle_seed, **collation)
    val_batches = validation_batches(data.validation, batch_size=config.eval_batch_size, **collation)
    evaluator = ExactMatchEvaluator(
        data.validation[: config.eval_examples],
        loaded_tokenizer,
        batch_size=config.eval_batch_size,
        max_new_tokens=config.decode_budget,
        baseline=config.baseline_eval,
    )
    best = BestCheckpoint(config.metric, min_delta=config.min_delta, tokenizer_file=tokenizer_file)
    early = None
    if config.patience is not None:
        early = EarlyStopping(config.metric, patience=config.patience, min_delta=config.min_delta)
    extra = {
        "finetune": config.to_dict(),
        "source": str(checkpoint),
        "train_file": str(train),
        "validation_file": str(validation),
    }
    job_callbacks = [evaluator, best, *([early] if early else []), *callbacks]
    options = JobOptions(callbacks=job_callbacks, strategy=strategy, tensorboard=tensorboard)
    trainer = build_trainer(
        model.config,
        train_config,
        run_dir,
        train_batches=source,
        validation=val_batches,
        resume=resume,
        options=options,
        model=model,
        initial_weights=initial_weights,
        extra_config=extra,
        checkpoint_files={TOKENIZER_FILE: tokenizer_file},
    )
    summary = trainer.train()
    strategy.barrier()  # the main rank's eval log and best model are written before any rank reads them
    log = read_eval_log(run_dir)
    best_record = next((r for r in log if r["step"] == best.tracker.best_step), None)
    return FinetuneResult(
        run_dir=run_dir,
        summary=summary,
        before=next((r for r in log if r["step"] == 0), None),
        best=best_record,
        last=log[-1] if log and log[-1]["step"] > 0 else None,
        best_dir=run_dir / BEST_DIR if best_record else None,
        stopped_early=early is not None and early.stopped_at is not None,
        skipped=data.skipped,
    )

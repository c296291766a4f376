"""Settings of a text-to-text fine-tuning task: fields, lengths, batching, the paper's dropout, evaluation."""

from __future__ import annotations

import dataclasses
import enum

import torch

from switchformer.config import Config


class BadRowPolicy(enum.Enum):
    """What to do with rows that are invalid JSON, miss a field, or hold a non-string or empty text."""

    ERROR = "error"  # refuse the file, listing every bad line
    SKIP = "skip"  # leave them out, logging each bad line with its reason


class WeightsDtype(enum.Enum):
    """The weights' precision while fine-tuning (checkpoints stream into it, block by block)."""

    FLOAT32 = "float32"
    BF16 = "bf16"  # the routers stay float32 (the paper's selective precision); half the memory of float32

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32 if self is WeightsDtype.FLOAT32 else torch.bfloat16


class Metric(enum.Enum):
    """The validation figure that picks the best checkpoint and drives early stopping."""

    VAL_LOSS = "val_loss"  # token cross-entropy on the validation targets (lower is better)
    EXACT_MATCH = "exact_match"  # share of greedy outputs equal to the target (higher is better)

    @property
    def higher_is_better(self) -> bool:
        return self is Metric.EXACT_MATCH


@dataclasses.dataclass
class FinetuneConfig(Config):
    """Task and evaluation settings; optimisation settings (steps, lr, eval_every) live in ``TrainConfig``."""

    input_field: str = "input"
    target_field: str = "target"
    max_input_length: int = 512  # tokens, eos included; longer inputs are cut (and counted in a warning)
    max_target_length: int = 128  # tokens, eos included
    batch_size: int = 16
    eval_batch_size: int = 32
    dropout: float = 0.1  # paper, fine-tuning: 0.1 on the non-expert layers ...
    expert_dropout: float = 0.4  # ... and 0.4 inside the experts ("expert dropout")
    bad_rows: BadRowPolicy = BadRowPolicy.ERROR
    metric: Metric = Metric.EXACT_MATCH
    patience: int | None = 3  # evaluations without improvement before stopping; None = never stop early
    min_delta: float = 0.0  # an improvement must beat the best value by more than this
    max_new_tokens: int | None = None  # greedy decoding budget for exact match; None = max_target_length
    eval_examples: int | None = None  # exact match on the first N validation rows; None = all of them
    baseline_eval: bool = True  # measure exact match once before the first step (reported as "before")
    shuffle_seed: int = 0  # training order: a fresh permutation of the rows per epoch from (seed, epoch)
    dtype: WeightsDtype = WeightsDtype.FLOAT32  # the weights' precision (checkpoints load straight into it)

    def validate(self) -> None:
        self.check(bool(self.input_field), "input_field", "must name a JSON field")
        self.check(bool(self.target_field), "target_field", "must name a JSON field")
        self.check(self.input_field != self.target_field, "target_field", "must differ from input_field")
        self.check(self.max_input_length >= 2, "max_input_length", "must be >= 2 (one token and eos)")
        self.check(self.max_target_length >= 2, "max_target_length", "must be >= 2 (one token and eos)")
        self.check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        self.check(0 <= self.dropout < 1, "dropout", "must be in [0, 1) (paper: 0.1)")
        self.check(0 <= self.expert_dropout < 1, "expert_dropout", "must be in [0, 1) (paper: 0.4)")
        self.check(self.patience is None or self.patience >= 1, "patience", "must be None or >= 1")
        self.check(self.min_delta >= 0, "min_delta", "must be >= 0")
        self.check(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens", "must be None or >= 1")
        self.check(self.eval_examples is None or self.eval_examples >= 1, "eval_examples", "must be None or >= 1")
        self.check(self.shuffle_seed >= 0, "shuffle_seed", "must be >= 0 (it seeds numpy generators)")

    @property
    def decode_budget(self) -> int:
        return self.max_new_tokens if self.max_new_tokens is not None else self.max_target_length

"""Text-to-text fine-tuning (paper section 4): JSON-lines input/target pairs, the paper's expert dropout (0.1
outside the experts, 0.4 inside), evaluation by validation loss and exact match, early stopping, best checkpoint.

``finetune(CHECKPOINT, train=..., validation=..., run_dir=...)`` is the whole job; the pieces (reading rows with
line-numbered errors, batching, exact match, the callbacks) are public for custom loops.
"""

from switchformer.finetune.batches import Example, ShuffledBatches, collate, encode_pairs, validation_batches
from switchformer.finetune.callbacks import (
    BestCheckpoint,
    BestTracker,
    EarlyStopping,
    ExactMatchEvaluator,
    read_eval_log,
)
from switchformer.finetune.config import BadRowPolicy, FinetuneConfig, Metric
from switchformer.finetune.evaluation import ExactMatchResult, exact_match, normalize_text
from switchformer.finetune.model import load_for_finetuning, with_dropout
from switchformer.finetune.rows import BadRow, BadRowsError, PairFile, TextPair, read_pairs
from switchformer.finetune.run import FinetuneData, FinetuneResult, finetune, load_tokenizer, prepare_finetune_data

__all__ = [
    "BadRow",
    "BadRowPolicy",
    "BadRowsError",
    "BestCheckpoint",
    "BestTracker",
    "EarlyStopping",
    "ExactMatchEvaluator",
    "ExactMatchResult",
    "Example",
    "FinetuneConfig",
    "FinetuneData",
    "FinetuneResult",
    "Metric",
    "PairFile",
    "ShuffledBatches",
    "TextPair",
    "collate",
    "encode_pairs",
    "exact_match",
    "finetune",
    "load_for_finetuning",
    "load_tokenizer",
    "normalize_text",
    "prepare_finetune_data",
    "read_eval_log",
    "read_pairs",
    "validation_batches",
    "with_dropout",
]

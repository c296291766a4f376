"""A synthetic text-to-text task (uppercase 1-3 letters), a word-level tokenizer and tiny checkpoints for it."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from switchformer import ModelConfig, MoEConfig, build_model
from switchformer.finetune import FinetuneConfig
from switchformer.training.config import TrainConfig

LETTERS = "abcdefgh"
TOKENS = ["<pad>", "</s>", "<unk>", *LETTERS, *LETTERS.upper()]  # pad 0, eos 1, unk 2 as in T5


def word_tokenizer() -> Tokenizer:
    """Whitespace-separated words, one id each; decoding joins them with spaces."""
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(TOKENS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(TOKENS[:3])
    return tokenizer


def tiny_config(architecture: str = "encoder-decoder", *, sparse: bool = True, **changes: Any) -> ModelConfig:
    moe = MoEConfig(num_experts=4, router_jitter=0.0) if sparse else None
    base = ModelConfig(architecture=architecture, vocab_size=len(TOKENS), d_model=32, d_ff=64, num_heads=4,
                       num_layers=2, dropout=0.0, moe=moe, init_scale=0.1)  # fmt: skip
    return base.replace(**changes)


def write_checkpoint(folder: Path, config: ModelConfig, *, seed: int = 0) -> Path:
    """A freshly initialised model saved with ``save_pretrained``, with the task's ``tokenizer.json``."""
    torch.manual_seed(seed)
    build_model(config).save_pretrained(folder)
    word_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def uppercase_rows(count: int, *, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        text = " ".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 3)))
        rows.append({"input": text, "target": text.upper()})
    return rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows are dicts (written as JSON) or raw strings (written as they are, for bad lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_task(folder: Path, *, train: int = 256, validation: int = 32) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return (write_jsonl(folder / "train.jsonl", uppercase_rows(train, seed=0)),
            write_jsonl(folder / "val.jsonl", uppercase_rows(validation, seed=1)))  # fmt: skip


def task_config(**changes: Any) -> FinetuneConfig:
    return FinetuneConfig(batch_size=16, eval_batch_size=32, max_new_tokens=6, patience=None).replace(**changes)


def train_config(**changes: Any) -> TrainConfig:
    base = TrainConfig(steps=150, lr=5e-3, schedule="constant", warmup_steps=5, eval_every=50, log_every=50,
                       checkpoint_every=1000, device="cpu", seed=0)  # fmt: skip
    return base.replace(**changes)


@pytest.fixture
def one_thread():
    """Tiny matmuls run several times faster on one thread, above all on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

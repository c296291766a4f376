"""A Hugging Face Switch checkpoint folder (built locally with ``transformers``) as the starting point."""

from __future__ import annotations

import pytest

from switchformer import Grouping, from_pretrained
from switchformer.finetune import finetune
from tests.finetune.helpers import (
    TOKENS,
    one_thread,  # noqa: F401 (a fixture)
    task_config,
    train_config,
    word_tokenizer,
    write_task,
)
from tests.interop.hf_models import tiny_hf  # skips this module without transformers


@pytest.mark.usefixtures("one_thread")
def test_finetune_from_a_hugging_face_folder(tmp_path):
    hf_dir = tmp_path / "hf"
    tiny_hf(vocab_size=len(TOKENS), pad_token_id=0, eos_token_id=1).save_pretrained(hf_dir)
    word_tokenizer().save(str(hf_dir / "tokenizer.json"))
    train, validation = write_task(tmp_path / "task", train=64, validation=16)
    result = finetune(
        hf_dir,
        train=train,
        validation=validation,
        run_dir=tmp_path / "run",
        config=task_config(),
        train_config=train_config(steps=20, eval_every=10),
        tensorboard=False,
    )
    assert result.summary["steps"] == 20
    assert result.best["val_loss"] < result.before["val_loss"]
    model = from_pretrained(result.best_dir)
    moe = model.config.moe
    # The paper's fine-tuning dropout replaces HF's dropout_rate; HF's routing semantics are kept.
    assert model.config.dropout == 0.1 and moe.expert_dropout == 0.4
    assert moe.grouping is Grouping.SEQUENCE and moe.expert_capacity == 64 and moe.num_experts == 4

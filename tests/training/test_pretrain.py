"""``pretrain()``, the library's entry point for pre-training, on a small slice of the built-in corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from switchformer import get_preset
from switchformer.data import DataConfig
from switchformer.errors import CheckpointError
from switchformer.run_folder import latest_run_checkpoint, read_run_config
from switchformer.training import RunConfigs, TrainConfig, pretrain
from switchformer.training.metrics import read_metrics
from switchformer.training.pretrain import default_data_config

LEGACY = Path(__file__).parents[1] / "fixtures" / "legacy"
TINY = ["d_model=32", "d_ff=64", "num_layers=2", "num_heads=2", "moe.num_experts=4"]


def _configs(steps: int = 3) -> tuple:
    model = get_preset("switch-tiny-8").with_overrides(TINY)
    train = TrainConfig(steps=steps, warmup_steps=1, eval_every=3, log_every=1, checkpoint_every=3, threads=1)
    data = default_data_config(model, vocab_size=600, sequence_length=32, batch_size=4, max_corpus_bytes=200_000)
    return model, train, data


def test_pretrain_trains_writes_its_configs_and_resumes_with_what_it_saved(tmp_path):
    model, train, data = _configs()
    run = tmp_path / "run"
    summary = pretrain(model, train, data, run, tensorboard=False)
    assert summary["steps"] == 3 and summary["final_val_loss"] is not None
    saved = RunConfigs.from_dict(read_run_config(run))
    assert saved.model.vocab_size == 600  # the model's vocabulary followed the tokenizer's
    assert saved.train == train and saved.data == data
    assert latest_run_checkpoint(run).name == "step-00000003"

    with pytest.raises(ValueError, match="already holds checkpoints; pass resume=True"):
        pretrain(model, train, data, run, tensorboard=False)
    # None = as saved: only the step budget changes.
    summary = pretrain(None, train.replace(steps=5), None, run, resume=True, tensorboard=False)
    assert summary["steps"] == 5
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]


def test_a_new_run_needs_every_config_and_resuming_an_empty_folder_names_what_is_missing(tmp_path):
    model, train, data = _configs()
    with pytest.raises(ValueError, match="needs its model, train and data configs"):
        pretrain(model, None, data, tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"holds no checkpoint and no config\.json"):
        pretrain(None, train, None, tmp_path / "b", resume=True)


def test_a_run_folder_written_by_an_earlier_version_resumes(tmp_path, monkeypatch):
    shutil.copytree(LEGACY, tmp_path / "legacy")
    monkeypatch.chdir(tmp_path / "legacy")  # its data source is the relative path "corpus"
    saved = RunConfigs.saved("train-run")
    assert isinstance(saved.data, DataConfig) and saved.train.steps == 4
    summary = pretrain(None, saved.train.replace(steps=6), None, "train-run", resume=True, tensorboard=False)
    assert summary["steps"] == 6
    assert [r["step"] for r in read_metrics(Path("train-run"))] == [1, 2, 3, 4, 5, 6]

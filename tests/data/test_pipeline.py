"""DataConfig validation and prepare_data end to end: shapes, caching, resumption, and the models accept the batches."""

from __future__ import annotations

import json

import pytest
import torch

from switchformer import ModelConfig, build_model
from switchformer.config import ConfigError
from switchformer.data import DataConfig, Objective, TokenizerKind, prepare_data

from .conftest import NUM_SENTINELS, VOCAB_SIZE, make_documents


@pytest.fixture
def corpus_dir(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(make_documents(120)):
        (folder / f"doc{i:03d}.txt").write_text(doc)
    return folder


def small_config(source, **changes) -> DataConfig:
    base = DataConfig(
        source=str(source), sequence_length=32, batch_size=4, vocab_size=VOCAB_SIZE, num_sentinels=NUM_SENTINELS,
        validation_fraction=0.1, validation_batches=2, seed=5,
    )  # fmt: skip
    return base.replace(**changes)


def test_config_defaults_follow_the_paper_and_round_trip_through_json():
    config = DataConfig()
    assert (config.noise_density, config.mean_noise_span_length, config.num_sentinels) == (0.15, 3.0, 100)
    assert (config.sequence_length, config.chunk_length, config.targets_length) == (256, 284, 58)
    assert DataConfig.from_json(config.to_json()) == config
    lm = config.with_overrides(["objective=causal-lm", "tokenizer_kind=unigram", "source=/data/x.jsonl"])
    assert (lm.objective, lm.tokenizer_kind, lm.source) == (Objective.CAUSAL_LM, TokenizerKind.UNIGRAM, "/data/x.jsonl")
    assert lm.chunk_length == lm.targets_length == 256


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"vocab_size": 300}, "vocab_size"),  # < 3 + 256 + 100
        ({"noise_density": 1.0}, "noise_density"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"sequence_length": 2000}, "num_sentinels"),  # 2000 inputs need 111 spans > 100 sentinels
        ({"objective": "masked-lm"}, "objective"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"DataConfig.{field}="):
        DataConfig(**changes)


@pytest.mark.parametrize("objective", list(Objective))
def test_prepare_data_batches_have_the_documented_shapes(corpus_dir, tmp_path, objective):
    config = small_config(corpus_dir, objective=objective)
    data = prepare_data(config, tmp_path / "cache")
    assert (data.tokenizer.pad_id, data.tokenizer.eos_id) == (0, 1)
    assert data.stats.documents == 120
    assert data.stats.train_documents + data.stats.validation_documents == 120
    assert data.stats.validation_documents >= 1 and data.stats.replaced_bytes == 0
    batch = next(data.train)
    labels_length = 32 if objective is Objective.CAUSAL_LM else config.targets_length
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 32)
    assert batch["labels"].shape == (4, labels_length)
    assert all(t.dtype == torch.int64 for t in batch.values())
    assert int(batch["input_ids"].max()) < data.tokenizer.vocab_size
    assert 1 <= len(data.validation) <= 2
    assert all(b["input_ids"].shape[1] == 32 for b in data.validation)
    assert data.stats_line().startswith(f"120 documents ({data.stats.validation_documents} validation)")


def test_second_run_reuses_the_cache_and_yields_the_same_data(corpus_dir, tmp_path):
    config = small_config(corpus_dir)
    first = prepare_data(config, tmp_path / "cache")
    second = prepare_data(config, tmp_path / "cache")
    assert (first.stats.from_cache, second.stats.from_cache) == (False, True)
    assert second.stats.cache_folder == first.stats.cache_folder
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    assert second.stats.train_tokens == first.stats.train_tokens
    for a, b in zip([next(first.train) for _ in range(3)], [next(second.train) for _ in range(3)], strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    for a, b in zip(first.validation, second.validation, strict=True):
        assert torch.equal(a["labels"], b["labels"])
    meta = json.loads((tmp_path / "cache" / first.stats.cache_folder.split("/")[-1] / "meta.json").read_text())
    assert meta["stats"]["train_tokens"] == first.stats.train_tokens


def test_changed_data_or_settings_get_a_fresh_cache(corpus_dir, tmp_path):
    first = prepare_data(small_config(corpus_dir), tmp_path / "cache")
    (corpus_dir / "doc000.txt").write_text("an edited document\n")
    edited = prepare_data(small_config(corpus_dir), tmp_path / "cache")
    unigram = prepare_data(small_config(corpus_dir, tokenizer_kind="unigram"), tmp_path / "cache")
    folders = {first.stats.cache_folder, edited.stats.cache_folder, unigram.stats.cache_folder}
    assert len(folders) == 3 and not edited.stats.from_cache


def test_the_seed_changes_the_order_but_not_the_split(corpus_dir, tmp_path):
    first = prepare_data(small_config(corpus_dir, seed=1), tmp_path)
    other_seed = prepare_data(small_config(corpus_dir, seed=2), tmp_path)
    other_split = prepare_data(small_config(corpus_dir, seed=1, split_seed=9), tmp_path)
    assert other_seed.stats.from_cache and other_seed.stats.cache_folder == first.stats.cache_folder
    for a, b in zip(first.validation, other_seed.validation, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])  # the same fixed validation set
    assert not torch.equal(next(first.train)["input_ids"], next(other_seed.train)["input_ids"])
    assert other_split.stats.cache_folder != first.stats.cache_folder


def test_tokens_made_by_another_tokenizer_are_not_reused(corpus_dir, tmp_path):
    first = prepare_data(small_config(corpus_dir), tmp_path)
    meta_path = tmp_path / first.stats.cache_folder.split("/")[-1] / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["tokenizer"] == first.tokenizer.fingerprint()
    meta_path.write_text(json.dumps({**meta, "tokenizer": "another"}))  # e.g. tokenizer.json was retrained
    again = prepare_data(small_config(corpus_dir), tmp_path)
    assert not again.stats.from_cache
    assert json.loads(meta_path.read_text())["tokenizer"] == first.tokenizer.fingerprint()


def test_resume_through_prepare_data(corpus_dir, tmp_path):
    config = small_config(corpus_dir)
    run = prepare_data(config, tmp_path / "cache")
    for _ in range(5):
        next(run.train)
    state = json.loads(json.dumps(run.train.state_dict()))
    expected = [next(run.train) for _ in range(3)]
    resumed = prepare_data(config, tmp_path / "cache")
    resumed.train.load_state_dict(state)
    for a, b in zip(expected, [next(resumed.train) for _ in range(3)], strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_a_saved_tokenizer_can_be_named_in_the_config(corpus_dir, tmp_path):
    trained = prepare_data(small_config(corpus_dir), tmp_path / "cache")
    path = trained.tokenizer.save(tmp_path / "tok" / "tokenizer.json")
    loaded = prepare_data(small_config(corpus_dir, tokenizer=str(path)), tmp_path / "cache")
    assert loaded.tokenizer.fingerprint() == trained.tokenizer.fingerprint()
    assert loaded.stats.train_tokens == trained.stats.train_tokens


def test_builtin_corpus_prepares_with_a_small_cap(tmp_path):
    config = DataConfig(
        sequence_length=32, batch_size=4, vocab_size=400, num_sentinels=NUM_SENTINELS, max_corpus_bytes=150_000
    )
    data = prepare_data(config, tmp_path)
    assert "standard library" in data.stats.corpus
    assert 150_000 <= data.stats.corpus_bytes < 600_000
    assert data.stats.train_tokens > 10_000 and data.validation


@pytest.mark.parametrize("objective", list(Objective))
def test_the_models_accept_the_batches(corpus_dir, tmp_path, objective):
    data = prepare_data(small_config(corpus_dir, objective=objective), tmp_path / "cache")
    architecture = "decoder-only" if objective is Objective.CAUSAL_LM else "encoder-decoder"
    model = build_model(
        ModelConfig(
            architecture=architecture, vocab_size=data.tokenizer.vocab_size, d_model=16, d_ff=32, num_heads=2,
            num_layers=1, dropout=0.0,
        )
    )  # fmt: skip
    for batch in [next(data.train), data.validation[-1]]:
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        assert torch.isfinite(loss)

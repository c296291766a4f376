"""From a :class:`DataConfig` to a tokenizer, an endless training stream and fixed validation batches.

``prepare_data`` reads the corpus, splits it by document, trains (or loads) the tokenizer, tokenises and packs both
splits, and caches the tokenizer and token arrays under ``cache_dir/data-<key>/``. The key hashes the split text
and the tokenizer settings, so a rerun with the same data skips the tokenising, while edited data or settings
never reuse a stale cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from switchformer.config import Config, ConfigError
from switchformer.data.corpus import cut_long_documents, read_corpus, split_documents
from switchformer.data.objectives import Batcher, Objective
from switchformer.data.packing import pack_documents, token_dtype
from switchformer.data.sources import open_source
from switchformer.data.span_corruption import compute_input_and_target_lengths, noise_span_counts
from switchformer.data.stream import BatchStream, fixed_batches
from switchformer.data.tokenizer import SwitchTokenizer, TokenizerKind, min_vocab_size, train_or_load_cached
from switchformer.run_folder import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

# The built-in corpus is capped so that preparing it (reading, training the tokenizer, tokenising) stays quick on
# a small CPU. 16 MiB covers all of CPython 3.11's non-test standard library (about 12 MB, 3.2M tokens).
BUILTIN_CORPUS_BYTES = 16 * 2**20
CACHE_VERSION = 1  # bump when the cached arrays' meaning changes
_ENCODE_GROUP = 256  # documents per encode_batch call: parallel inside tokenizers, bounded memory outside


@dataclasses.dataclass
class DataConfig(Config):
    """Where the text comes from, how it is tokenised and how it becomes batches."""

    source: str | None = None  # file, folder or hub dataset name; None = built-in corpus (the Python stdlib)
    text_field: str = "text"  # JSON-lines key / Parquet column / dataset column holding the text
    dataset_config: str | None = None  # hub dataset configuration, e.g. "wikitext-2-raw-v1"
    dataset_split: str = "train"  # hub dataset split to read (validation is carved out of it by document)
    objective: Objective = Objective.SPAN_CORRUPTION
    sequence_length: int = 256  # encoder input length (span corruption) or context length (causal LM)
    batch_size: int = 16  # sequences per batch
    tokenizer: str | None = None  # tokenizer.json / SentencePiece .model / hub name; None = train one
    tokenizer_kind: TokenizerKind = TokenizerKind.BPE
    vocab_size: int = 8192  # including 3 specials and the sentinels (a trained tokenizer may end up smaller)
    num_sentinels: int = 100  # T5 has 100 <extra_id_i>; span corruption needs one per noise span
    noise_density: float = 0.15  # T5: 15% of tokens are corrupted ...
    mean_noise_span_length: float = 3.0  # ... in spans of mean length 3
    validation_fraction: float = 0.02  # share of documents held out for validation
    validation_batches: int = 8  # size of the fixed validation set, in batches
    seed: int = 0  # data order and span-corruption noise
    split_seed: int = 0  # split and validation noise: apart from `seed`, so all seeds validate on the same batches
    max_corpus_bytes: int | None = None  # stop reading here; None = BUILTIN_CORPUS_BYTES for the built-in corpus,
    #                                      no cap for named sources
    max_document_chars: int = 65536  # longer documents are cut at line breaks (lets one big file be split)

    def validate(self) -> None:
        self.check(bool(self.text_field), "text_field", "must name a field")
        self.check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.check(self.num_sentinels >= 0, "num_sentinels", "must be >= 0")
        if self.tokenizer is None:
            least = min_vocab_size(self.num_sentinels)
            self.check(self.vocab_size >= least, "vocab_size", f"must be >= {least} (specials, bytes, sentinels)")
        self.check(0 < self.noise_density < 1, "noise_density", "must be in (0, 1)")
        self.check(self.mean_noise_span_length >= 1, "mean_noise_span_length", "must be >= 1")
        self.check(0 <= self.validation_fraction < 1, "validation_fraction", "must be in [0, 1)")
        self.check(self.validation_batches >= 0, "validation_batches", "must be >= 0")
        self.check(self.seed >= 0, "seed", "must be >= 0 (it seeds numpy generators)")
        self.check(self.split_seed >= 0, "split_seed", "must be >= 0")
        self.check(self.max_corpus_bytes is None or self.max_corpus_bytes >= 1, "max_corpus_bytes", "None or >= 1")
        self.check(self.max_document_chars >= 1, "max_document_chars", "must be >= 1")
        self.check(self.sequence_length >= 4, "sequence_length", "must be >= 4")
        if self.objective is Objective.SPAN_CORRUPTION:
            try:
                tokens_length = self.chunk_length
            except ValueError as error:
                raise ConfigError(f"DataConfig.sequence_length={self.sequence_length} is invalid: {error}") from None
            spans = noise_span_counts(tokens_length, self.noise_density, self.mean_noise_span_length).noise_spans
            self.check(
                spans <= self.num_sentinels,
                "num_sentinels",
                f"must be >= {spans}: sequence_length={self.sequence_length} gives {spans} noise spans per example",
            )

    @property
    def chunk_length(self) -> int:
        """Raw tokens per example (span corruption consumes more than ``sequence_length``: the noise is cut out)."""
        if self.objective is Objective.CAUSAL_LM:
            return self.sequence_length
        return compute_input_and_target_lengths(
            self.sequence_length, self.noise_density, self.mean_noise_span_length
        ).tokens_length

    @property
    def targets_length(self) -> int:
        """Label columns per example: the decoder length for span corruption, ``sequence_length`` for the LM."""
        if self.objective is Objective.CAUSAL_LM:
            return self.sequence_length
        return compute_input_and_target_lengths(
            self.sequence_length, self.noise_density, self.mean_noise_span_length
        ).targets_length


@dataclasses.dataclass(frozen=True)
class DataStats:
    """What preparing the data found; logged by the trainer and written beside the cache."""

    corpus: str  # a description of the source
    documents: int  # non-empty documents after cutting long ones
    train_documents: int
    validation_documents: int
    corpus_bytes: int  # UTF-8 bytes read
    replaced_bytes: int  # undecodable bytes replaced by U+FFFD
    train_tokens: int  # packed tokens including one eos per document
    validation_tokens: int
    vocab_size: int  # the tokenizer's, including specials and sentinels
    cache_folder: str
    from_cache: bool  # token arrays loaded rather than computed


@dataclasses.dataclass
class PreparedData:
    tokenizer: SwitchTokenizer
    train: BatchStream  # endless; state_dict()/load_state_dict() for resuming
    validation: list[dict[str, torch.Tensor]]  # fixed: the same batches on every call and run
    stats: DataStats

    def stats_line(self) -> str:
        """One line for a summary table, e.g. ``778 documents (13 validation), 3,151,766 training tokens, ...``."""
        s = self.stats
        line = (
            f"{s.documents:,} documents ({s.validation_documents:,} validation), {s.train_tokens:,} training tokens, "
            f"{len(self.validation)} validation batches, vocab {s.vocab_size:,}"
        )
        return line + (f", {s.replaced_bytes:,} undecodable bytes replaced" if s.replaced_bytes else "")


def prepare_data(config: DataConfig, cache_dir: Path) -> PreparedData:
    """Read, split, tokenise and batch the corpus named by ``config``, caching the work under ``cache_dir``."""
    started = time.perf_counter()
    source = open_source(
        config.source,
        text_field=config.text_field,
        dataset_config=config.dataset_config,
        dataset_split=config.dataset_split,
    )
    cap = config.max_corpus_bytes or (BUILTIN_CORPUS_BYTES if config.source is None else None)
    corpus = read_corpus(source, max_bytes=cap)
    documents = cut_long_documents(corpus.documents, config.max_document_chars)
    split = split_documents(documents, validation_fraction=config.validation_fraction, seed=config.split_seed)

    loaded = None
    if config.tokenizer is not None:
        loaded = SwitchTokenizer.load(config.tokenizer, num_sentinels=config.num_sentinels)
    tokenizer_spec = (
        f"train:{config.tokenizer_kind.value}:{config.vocab_size}:{config.num_sentinels}"
        if loaded is None
        else f"load:{loaded.fingerprint()}"
    )
    folder = Path(cache_dir) / f"data-{_cache_key(split.train, split.validation, tokenizer_spec)}"
    folder.mkdir(parents=True, exist_ok=True)
    if loaded is None:
        tokenizer = train_or_load_cached(
            folder,
            split.train,
            kind=config.tokenizer_kind,
            vocab_size=config.vocab_size,
            num_sentinels=config.num_sentinels,
        )
    else:
        tokenizer = loaded
        tokenizer.save(folder)
    _check_tokenizer(config, tokenizer)

    train_tokens, validation_tokens, from_cache = _cached_tokens(folder, tokenizer, split.train, split.validation)
    stats = DataStats(
        corpus=corpus.description,
        documents=len(documents),
        train_documents=len(split.train),
        validation_documents=len(split.validation),
        corpus_bytes=corpus.stats.bytes,
        replaced_bytes=corpus.stats.replaced_bytes,
        train_tokens=len(train_tokens),
        validation_tokens=len(validation_tokens),
        vocab_size=tokenizer.vocab_size,
        cache_folder=str(folder),
        from_cache=from_cache,
    )
    if not from_cache:  # written last: its presence says the arrays beside it are complete
        meta = {"version": CACHE_VERSION, "tokenizer": tokenizer.fingerprint(), "stats": dataclasses.asdict(stats)}
        atomic_write_json(folder / "meta.json", meta)

    batcher = Batcher(
        objective=config.objective,
        sequence_length=config.sequence_length,
        pad_id=tokenizer.pad_id,
        eos_id=tokenizer.eos_id,
        sentinel_ids=tokenizer.sentinel_ids,
        noise_density=config.noise_density,
        mean_noise_span_length=config.mean_noise_span_length,
    )
    train = BatchStream(train_tokens, batcher=batcher, batch_size=config.batch_size, seed=config.seed)
    validation = fixed_batches(
        validation_tokens,
        batcher=batcher,
        batch_size=config.batch_size,
        max_batches=config.validation_batches,
        seed=config.split_seed,  # like the split itself, the validation noise does not change with `seed`
    )
    logger.info(
        "data: %s, %d documents (%d validation), %d train tokens, %d validation batches, vocab %d, %.1fs%s",
        corpus.description,
        len(documents),
        len(split.validation),
        len(train_tokens),
        len(validation),
        tokenizer.vocab_size,
        time.perf_counter() - started,
        " (cached)" if from_cache else "",
    )
    return PreparedData(tokenizer, train, validation, stats)


def _check_tokenizer(config: DataConfig, tokenizer: SwitchTokenizer) -> None:
    if config.objective is not Objective.SPAN_CORRUPTION:
        return
    spans = noise_span_counts(config.chunk_length, config.noise_density, config.mean_noise_span_length).noise_spans
    if tokenizer.num_sentinels < spans:
        raise ConfigError(
            f"DataConfig.tokenizer={config.tokenizer!r} is invalid: it has {tokenizer.num_sentinels} sentinels but "
            f"sequence_length={config.sequence_length} needs {spans}; use a shorter sequence_length"
        )


def _cache_key(train: list[str], validation: list[str], tokenizer_spec: str) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{tokenizer_spec}|".encode())
    for part in (train, validation):
        digest.update(f"{len(part)}|".encode())
        for document in part:
            encoded = document.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
    return digest.hexdigest()[:16]


def _cached_tokens(
    folder: Path, tokenizer: SwitchTokenizer, train: list[str], validation: list[str]
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Token arrays of both splits from ``folder`` when made there by this very tokenizer, else computed and saved."""
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("version") == CACHE_VERSION and meta.get("tokenizer") == tokenizer.fingerprint():
            return np.load(folder / "train.npy"), np.load(folder / "validation.npy"), True
        logger.warning("token cache %s was made with another tokenizer or version; tokenising again", folder)
        meta_path.unlink()
    dtype = token_dtype(tokenizer.vocab_size)
    train_tokens, validation_tokens = _tokenize(tokenizer, train, dtype), _tokenize(tokenizer, validation, dtype)
    _save_array(folder / "train.npy", train_tokens)
    _save_array(folder / "validation.npy", validation_tokens)
    return train_tokens, validation_tokens, False


def _tokenize(tokenizer: SwitchTokenizer, documents: list[str], dtype: np.dtype) -> np.ndarray:
    pieces = [
        pack_documents(tokenizer.encode_batch(documents[i : i + _ENCODE_GROUP]), eos_id=tokenizer.eos_id, dtype=dtype)
        for i in range(0, len(documents), _ENCODE_GROUP)
    ]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _save_array(path: Path, array: np.ndarray) -> None:
    """Temporary file, then rename: an interrupted run never leaves a truncated cache behind."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.save(handle, array)

    atomic_write(path, write)

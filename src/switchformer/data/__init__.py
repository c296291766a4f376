"""Data: corpora, tokenizer, T5 span corruption, packing and a resumable batch stream.

The trainer needs two names: :class:`DataConfig` and :func:`prepare_data`; the rest is public for tests, tools and
anyone who wants one piece (e.g. span corruption on their own token ids).
"""

from switchformer.data.corpus import Corpus, DocumentSplit, cut_long_documents, read_corpus, split_documents
from switchformer.data.objectives import IGNORE_INDEX, Batcher, Objective
from switchformer.data.packing import Chunks, pack_documents, split_into_chunks, token_dtype
from switchformer.data.pipeline import BUILTIN_CORPUS_BYTES, DataConfig, DataStats, PreparedData, prepare_data
from switchformer.data.sources import (
    CorpusError,
    CorpusNotFoundError,
    DocumentSource,
    Folder,
    HuggingFaceDataset,
    JsonLines,
    Parquet,
    ReadStats,
    TextFiles,
    builtin_corpus,
    decode_utf8,
    open_source,
)
from switchformer.data.span_corruption import (
    CorruptedSpans,
    SpanLengths,
    compute_input_and_target_lengths,
    noise_span_to_unique_sentinel,
    nonnoise_span_to_unique_sentinel,
    random_spans_noise_mask,
    span_corrupt,
)
from switchformer.data.stream import BatchStream, fixed_batches
from switchformer.data.tokenizer import (
    SwitchTokenizer,
    TokenizerKind,
    TokenizerNotFoundError,
    sentinel_token,
    train_or_load_cached,
)

__all__ = [
    "BUILTIN_CORPUS_BYTES",
    "IGNORE_INDEX",
    "BatchStream",
    "Batcher",
    "Chunks",
    "Corpus",
    "CorpusError",
    "CorpusNotFoundError",
    "CorruptedSpans",
    "DataConfig",
    "DataStats",
    "DocumentSource",
    "DocumentSplit",
    "Folder",
    "HuggingFaceDataset",
    "JsonLines",
    "Objective",
    "Parquet",
    "PreparedData",
    "ReadStats",
    "SpanLengths",
    "SwitchTokenizer",
    "TextFiles",
    "TokenizerKind",
    "TokenizerNotFoundError",
    "builtin_corpus",
    "compute_input_and_target_lengths",
    "cut_long_documents",
    "decode_utf8",
    "fixed_batches",
    "noise_span_to_unique_sentinel",
    "nonnoise_span_to_unique_sentinel",
    "open_source",
    "pack_documents",
    "prepare_data",
    "random_spans_noise_mask",
    "read_corpus",
    "sentinel_token",
    "span_corrupt",
    "split_documents",
    "split_into_chunks",
    "token_dtype",
    "train_or_load_cached",
]

"""Random bytes, odd encodings, empty documents and huge lines, read from real files and through the whole data
pipeline: nothing crashes, every undecodable byte is counted exactly, and no counted byte is lost on the way to
tokens and span-corrupted batches.

``tests/data/test_properties.py`` covers the pieces in memory (``decode_utf8`` bounds, tokenizer round trips,
cutting and packing, span corruption); this file adds exact replacement counts against Python's own decoder,
the file readers (text, folders, JSON lines with escaped lone surrogates) and ``prepare_data`` end to end.
"""

from __future__ import annotations

import codecs
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchformer.config import ConfigError
from switchformer.data import (
    CorpusError,
    DataConfig,
    Folder,
    JsonLines,
    ReadStats,
    SwitchTokenizer,
    cut_long_documents,
    decode_utf8,
    prepare_data,
    split_documents,
)
from tests.data.test_span_corruption import reconstruct

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_replaced: list[int] = []


def _count_replaced(error: UnicodeDecodeError) -> tuple[str, int]:
    _replaced.append(error.end - error.start)
    return "\ufffd", error.end


codecs.register_error("switchformer-test-count", _count_replaced)


def reference_decode(raw: bytes) -> tuple[str, int]:
    """Python's UTF-8 decoder with ``errors='replace'``, counting the bytes each replacement stands for."""
    _replaced.clear()
    text = raw.decode("utf-8", errors="switchformer-test-count")
    assert text == raw.decode("utf-8", errors="replace")
    return text, sum(_replaced)


# -- byte strategies -----------------------------------------------------------------------------------------
ENCODINGS = ["latin-1", "cp1252", "shift_jis", "gb18030", "utf-16", "utf-16-be", "utf-32", "utf-8-sig", "utf-7"]
NASTY = [
    b"\xed\xa0\x80",  # a surrogate encoded in UTF-8 (CESU-8)
    b"\xc0\xaf",  # overlong "/"
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xf0\x9f\x98",  # a 4-byte sequence cut short
    b"\xef\xbb\xbf",  # a byte-order mark
    b"\xef\xbf\xbd",  # a real U+FFFD, which is not a replacement
    b"\x00" * 5,
    b"\r\n\r",
    b"\x80",
]
PIECES = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=40).map(str.encode),
    st.tuples(st.text(max_size=40), st.sampled_from(ENCODINGS)).map(lambda p: p[0].encode(p[1], errors="replace")),
    st.sampled_from(NASTY),
)
RAW = st.lists(PIECES, max_size=8).map(b"".join)
HUGE_LINE = st.just(b"x\xff" * 40_000)  # one 80,000-character line with bad bytes throughout: cut mid-line
FILES = st.lists(st.one_of(RAW, RAW, st.just(b""), HUGE_LINE), min_size=1, max_size=5)


@FAST
@given(raw=RAW)
def test_replaced_bytes_are_counted_exactly(raw: bytes) -> None:
    assert decode_utf8(raw) == reference_decode(raw)


@pytest.fixture(scope="module")
def tokenizer() -> SwitchTokenizer:
    documents = ["def f(x):\n    return x + 1\n", "Ünïcödé 日本語 🙂 text\n", "plain words here\n"] * 5
    return SwitchTokenizer.train(documents, vocab_size=300, num_sentinels=8)


def _read_a_folder(tokenizer: SwitchTokenizer, contents: list[bytes], max_chars: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for index, data in enumerate(contents):
            (Path(tmp) / f"doc{index:02d}.txt").write_bytes(data)
        stats = ReadStats()
        documents = list(Folder(Path(tmp)).documents(stats))
    expected = [reference_decode(data) for data in contents]
    assert documents == [text for text, _ in expected]
    assert stats.replaced_bytes == sum(count for _, count in expected)
    assert stats.bytes == sum(len(d.encode("utf-8")) for d in documents)
    pieces = cut_long_documents(documents, max_chars)
    assert "".join(pieces) == "".join(documents)
    assert [tokenizer.decode(ids) for ids in tokenizer.encode_batch(pieces)] == pieces


def _examples(count: int) -> settings:
    return settings(max_examples=count, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


_folders = given(contents=FILES, max_chars=st.integers(256, 70_000))
test_a_folder_of_any_bytes_is_read_counted_and_tokenised_losslessly = _examples(30)(_folders(_read_a_folder))
test_folders_thoroughly = pytest.mark.slow(_examples(400)(_folders(_read_a_folder)))


LONE = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
JSON_TEXT = st.lists(st.one_of(st.text(max_size=20), LONE), max_size=6).map("".join)


@FAST
@given(texts=st.lists(JSON_TEXT, min_size=1, max_size=5), junk=st.lists(RAW, min_size=1, max_size=5))
def test_json_lines_with_lone_surrogates_and_bad_bytes_are_counted(
    tokenizer: SwitchTokenizer, texts: list[str], junk: list[bytes]
) -> None:
    """Escaped lone surrogates (valid JSON, invalid Unicode) would crash the Rust tokenizer: they are replaced and
    counted like undecodable bytes. Raw bad bytes inside a string value are replaced before parsing."""
    lines = [json.dumps({"text": text}).encode() for text in texts]
    lines += [b'{"text": "' + data.replace(b"\\", b"").replace(b'"', b"").replace(b"\n", b"") + b'"}' for data in junk]
    raw = b"\n".join(lines) + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.jsonl").write_bytes(raw)
        stats = ReadStats()
        try:
            documents = list(JsonLines(Path(tmp) / "corpus.jsonl").documents(stats))
        except CorpusError as error:  # control characters from the junk can make a line invalid JSON
            assert "corpus.jsonl:" in str(error) and "not valid JSON" in str(error)
            return
    decoded = [json.loads(line) for line in reference_decode(raw)[0].split("\n") if line.strip()]
    lone = sum(1 for record in decoded for ch in record["text"] if 0xD800 <= ord(ch) <= 0xDFFF)
    assert stats.replaced_bytes == reference_decode(raw)[1] + lone
    assert all(not 0xD800 <= ord(ch) <= 0xDFFF for d in documents for ch in d)
    assert stats.bytes == sum(len(d.encode("utf-8")) for d in documents)
    for document in documents:
        assert tokenizer.decode(tokenizer.encode(document)) == document


def _prepare(tmp_path_factory: pytest.TempPathFactory, contents: list[bytes], max_chars: int, seed: int) -> None:
    """``prepare_data`` on a folder of random files either fails with a clear error or gives token streams that
    decode back to every document and batches whose span corruption reconstructs a chunk of the stream."""
    work = tmp_path_factory.mktemp("corpus")
    for index, data in enumerate(contents):
        (work / "corpus").mkdir(exist_ok=True)
        (work / "corpus" / f"doc{index:02d}.txt").write_bytes(data)
    config = DataConfig(source=str(work / "corpus"), vocab_size=267 + 8, num_sentinels=8, sequence_length=8,
                        batch_size=1, validation_fraction=0.3, validation_batches=1, max_document_chars=max_chars,
                        seed=seed)  # fmt: skip
    try:
        data = prepare_data(config, work / "run")
    except (CorpusError, ConfigError) as error:  # empty corpus, too small to split or for one batch
        assert "corpus" in str(error) or "training split" in str(error), str(error)
        return
    texts = [reference_decode(raw) for raw in contents]
    assert data.stats.replaced_bytes == sum(count for _, count in texts)
    assert data.stats.corpus_bytes == sum(len(text.encode("utf-8")) for text, _ in texts)
    documents = cut_long_documents([text for text, _ in texts if text], max_chars)
    split = split_documents(documents, validation_fraction=0.3, seed=0)
    folder = Path(data.stats.cache_folder)
    for part, name in ((split.train, "train"), (split.validation, "validation")):
        stream = np.load(folder / f"{name}.npy")
        ends = np.flatnonzero(stream == data.tokenizer.eos_id)
        segments = np.split(stream, ends + 1)[:-1]
        assert [data.tokenizer.decode(s[:-1].tolist()) for s in segments] == [d for d in part if d]
    train = np.load(folder / "train.npy").astype(np.int64)
    batch = next(data.train)
    chunk = reconstruct(batch["input_ids"][0].numpy(), batch["labels"][0].numpy(), data.tokenizer.sentinel_ids)
    windows = np.lib.stride_tricks.sliding_window_view(train, len(chunk))
    assert (windows == np.array(chunk)).all(axis=1).any(), "a training example is not a chunk of the token stream"


_corpora = given(contents=FILES, max_chars=st.integers(50, 5000), seed=st.integers(0, 3))
test_prepare_data_on_any_corpus_builds_batches_that_lose_nothing = _examples(12)(_corpora(_prepare))
test_prepare_data_thoroughly = pytest.mark.slow(_examples(150)(_corpora(_prepare)))

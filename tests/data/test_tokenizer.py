"""SwitchTokenizer: T5's special ids, exact byte-level round trip, save/load, cache reuse, SentencePiece import."""

from __future__ import annotations

import logging

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from switchformer.data import SwitchTokenizer, TokenizerKind, TokenizerNotFoundError, train_or_load_cached

from .conftest import NUM_SENTINELS, VOCAB_SIZE

TRICKY = [
    "def f(x):\n\treturn x  # tabs,  double  spaces, trailing space \n",
    "Ünïcödé, 日本語, emoji 👩‍👩‍👧 and a CJK extension 𠀀; RTL עברית\r\n",
    "literal specials stay text: </s> <pad> <unk> <extra_id_0>",
    "",
    " leading space and \x00 NUL and \x7f DEL and \u2028 line separator",
]


def test_special_ids_follow_t5(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
    assert tokenizer.num_sentinels == NUM_SENTINELS
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert tokenizer.sentinel_id(0) == tokenizer.vocab_size - 1  # <extra_id_0> is the highest id
    assert [tokenizer.sentinel_id(i) for i in range(NUM_SENTINELS)] == list(range(VOCAB_SIZE - 1, VOCAB_SIZE - 9, -1))
    assert tokenizer.sentinel_ids.tolist() == [tokenizer.sentinel_id(i) for i in range(NUM_SENTINELS)]
    with pytest.raises(IndexError, match="8 sentinels"):
        tokenizer.sentinel_id(NUM_SENTINELS)


@pytest.mark.parametrize("kind", list(TokenizerKind))
def test_round_trip_is_exact_for_code_and_unicode(documents, kind):
    tokenizer = SwitchTokenizer.train(documents, kind=kind, vocab_size=VOCAB_SIZE, num_sentinels=NUM_SENTINELS)
    for text in [*TRICKY, *documents[:4]]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_text_spelling_special_tokens_never_becomes_special_ids(tokenizer):
    ids = tokenizer.encode(TRICKY[2])
    specials = {tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id, *tokenizer.sentinel_ids.tolist()}
    assert not specials.intersection(ids)


def test_eos_only_when_asked(tokenizer):
    plain = tokenizer.encode("hello")
    assert tokenizer.eos_id not in plain
    assert tokenizer.encode("hello", add_eos=True) == [*plain, tokenizer.eos_id]
    assert tokenizer.encode_batch(["hello", ""], add_eos=True) == [[*plain, 1], [1]]
    assert tokenizer.decode([*plain, tokenizer.eos_id]) == "hello</s>"
    assert tokenizer.decode([*plain, tokenizer.eos_id], skip_special_tokens=True) == "hello"


def test_training_learns_merges(tokenizer, documents):
    text = documents[0]
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) * 0.8  # better than raw bytes


def test_save_and_load_round_trip(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    for where in (path, tmp_path):
        loaded = SwitchTokenizer.load(where, num_sentinels=NUM_SENTINELS)
        assert loaded.fingerprint() == tokenizer.fingerprint()
        assert loaded.encode(TRICKY[1]) == tokenizer.encode(TRICKY[1])
        assert loaded.encode(TRICKY[2]) == tokenizer.encode(TRICKY[2])  # the special-token setting survives
        assert loaded.sentinel_ids.tolist() == tokenizer.sentinel_ids.tolist()
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temporary file


def test_cache_is_reused_without_reading_documents(documents, tmp_path):
    first = train_or_load_cached(tmp_path, documents, vocab_size=VOCAB_SIZE, num_sentinels=NUM_SENTINELS)

    def must_not_be_read():
        raise AssertionError("the cached tokenizer should have been reused")
        yield ""

    second = train_or_load_cached(tmp_path, must_not_be_read(), vocab_size=VOCAB_SIZE, num_sentinels=NUM_SENTINELS)
    assert second.fingerprint() == first.fingerprint()
    retrained = train_or_load_cached(tmp_path, documents, vocab_size=VOCAB_SIZE, num_sentinels=NUM_SENTINELS - 1)
    assert retrained.num_sentinels == NUM_SENTINELS - 1  # settings changed: not silently reused


def test_too_small_vocabulary_is_a_clear_error(documents):
    with pytest.raises(ValueError, match="at least 267"):
        SwitchTokenizer.train(documents, vocab_size=200, num_sentinels=NUM_SENTINELS)


def test_missing_tokenizer_path_names_the_path(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match=r"nope\.json"):
        SwitchTokenizer.load(tmp_path / "nope.json")
    with pytest.raises(TokenizerNotFoundError, match=r"no tokenizer\.json"):
        SwitchTokenizer.load(tmp_path)


def test_foreign_tokenizer_gets_pad_eos_and_sentinels_appended(documents, tmp_path, caplog):
    foreign = Tokenizer(models.BPE())
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    foreign.train_from_iterator(documents, trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"]))
    foreign.save(str(tmp_path / "tokenizer.json"))
    size = foreign.get_vocab_size()
    with caplog.at_level(logging.WARNING):
        tokenizer = SwitchTokenizer.load(tmp_path, num_sentinels=4)
    assert (tokenizer.pad_id, tokenizer.eos_id) == (size, size + 1)
    assert "no <pad> token" in caplog.text
    assert tokenizer.sentinel_id(0) == tokenizer.vocab_size - 1 == size + 5


def test_sentencepiece_unigram_model_loads_with_t5_ids(documents, tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(line for doc in documents for line in doc.splitlines() if line.strip()))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    tokenizer = SwitchTokenizer.load(tmp_path / "spm.model", num_sentinels=NUM_SENTINELS)
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
    assert tokenizer.vocab_size == 120 + NUM_SENTINELS
    assert tokenizer.sentinel_id(0) == tokenizer.vocab_size - 1
    for text in ["Plain English text number 7.", "def function_3(x, y=3):", "The lazy dog jumps"]:
        assert tokenizer.encode(text) == processor.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == processor.decode(processor.encode(text))

"""Padding, labels on the target only, truncation, and a deterministic resumable shuffle."""

from __future__ import annotations

import pytest

from switchformer import Architecture
from switchformer.data.tokenizer import SwitchTokenizer
from switchformer.finetune import FinetuneConfig, ShuffledBatches, TextPair, collate, encode_pairs
from switchformer.finetune.batches import prompt_batch
from tests.finetune.helpers import word_tokenizer

ENC_DEC, DEC_ONLY = Architecture.ENCODER_DECODER, Architecture.DECODER_ONLY


@pytest.fixture
def tokenizer():
    return SwitchTokenizer(word_tokenizer(), num_sentinels=0)


def pairs(*rows: tuple[str, str]) -> list[TextPair]:
    return [TextPair(i + 1, a, b) for i, (a, b) in enumerate(rows)]


def test_encoder_decoder_batch_pads_inputs_and_ignores_padded_labels(tokenizer):
    examples = encode_pairs(pairs(("a b c", "A"), ("d", "D E")), tokenizer, FinetuneConfig())
    batch = collate(examples, ENC_DEC, pad_id=0)
    # ids: a=3 ... h=10, A=11 ... H=18; eos=1
    assert batch["input_ids"].tolist() == [[3, 4, 5, 1], [6, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[11, 1, -100], [14, 15, 1]]


def test_decoder_only_batch_puts_labels_on_the_target_only(tokenizer):
    examples = encode_pairs(pairs(("a b", "A B"), ("c", "C")), tokenizer, FinetuneConfig())
    batch = collate(examples, DEC_ONLY, pad_id=0)
    assert batch["input_ids"].tolist() == [[3, 4, 1, 11, 12, 1], [5, 1, 13, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 11, 12, 1], [-100, -100, 13, 1, -100, -100]]
    prompts = prompt_batch(examples, DEC_ONLY, pad_id=0)  # left-padded for generation
    assert prompts["input_ids"].tolist() == [[3, 4, 1], [0, 5, 1]]
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]


def test_long_texts_are_cut_keeping_eos_and_counted_in_a_warning(tokenizer, caplog):
    config = FinetuneConfig(max_input_length=3, max_target_length=2)
    (example,) = encode_pairs(pairs(("a b c d", "A B C")), tokenizer, config)
    assert example.prompt_ids == (3, 4, 1) and example.target_ids == (11, 1) and example.target == "A B C"
    assert "cut 1 of 1 inputs to max_input_length=3 and 1 targets" in caplog.text


def test_shuffle_is_deterministic_covers_each_epoch_and_resumes_exactly(tokenizer):
    rows = pairs(*[(letter, letter.upper()) for letter in "abcdefgh"])
    examples = encode_pairs(rows, tokenizer, FinetuneConfig())

    def source(seed=0):
        return ShuffledBatches(examples, batch_size=3, architecture=ENC_DEC, pad_id=0, seed=seed)

    stream = source()
    batches = [next(stream)["input_ids"][:, 0].tolist() for _ in range(8)]  # 24 examples: 3 epochs of 8
    again = source()
    assert [next(again)["input_ids"][:, 0].tolist() for _ in range(8)] == batches
    flat = [token for batch in batches for token in batch]
    for epoch in range(3):
        assert sorted(flat[8 * epoch : 8 * epoch + 8]) == list(range(3, 11))  # every example once per epoch
    assert flat[:8] != flat[8:16]  # a fresh order each epoch
    other = source(seed=1)
    assert [next(other)["input_ids"][:, 0].tolist() for _ in range(8)] != batches

    interrupted = source()
    for _ in range(5):
        next(interrupted)
    resumed = source()
    resumed.load_state_dict(interrupted.state_dict())
    assert [next(resumed)["input_ids"][:, 0].tolist() for _ in range(3)] == batches[5:]
    with pytest.raises(ValueError, match="saved seed=1"):
        source().load_state_dict(other.state_dict())

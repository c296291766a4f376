"""Shared tiny corpora and a tiny tokenizer for the data tests (all local, all fast)."""

from __future__ import annotations

import pytest

from switchformer.data import SwitchTokenizer, TokenizerKind

NUM_SENTINELS = 8
VOCAB_SIZE = 320  # 3 specials + 256 bytes + 8 sentinels + a few merges


def make_documents(count: int = 40) -> list[str]:
    """Code, prose and non-ASCII text, each document distinct (the split hashes document text)."""
    templates = [
        "def function_{i}(x, y={i}):\n    '''Return x plus {i}.'''\n    return x + y  # naïve\n",
        "Ünïcödé line {i}: 日本語のテキスト, emoji 🙂 and math ∑ x_{i}²\n\nSecond paragraph.\n",
        "class Thing{i}:\n\tvalue = {i}\n\n\tdef __repr__(self):\n\t\treturn f'<Thing {{self.value}}>'\n",
        "Plain English text number {i}. The quick brown fox jumps over the lazy dog.\n",
    ]
    return [templates[i % len(templates)].format(i=i) for i in range(count)]


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return make_documents()


@pytest.fixture(scope="session")
def tokenizer(documents) -> SwitchTokenizer:
    return SwitchTokenizer.train(documents, kind=TokenizerKind.BPE, vocab_size=VOCAB_SIZE, num_sentinels=NUM_SENTINELS)

"""Fine-tuning callbacks under data parallelism: each rank decodes its share of the examples, and the shares add up."""

from __future__ import annotations

import types

from switchformer.finetune import callbacks
from switchformer.finetune.evaluation import ExactMatchResult


def test_exact_match_is_decoded_in_shares_and_summed_over_the_ranks(monkeypatch):
    decoded = []

    def fake_exact_match(model, examples, tokenizer, **kwargs):
        decoded.append(list(examples))
        return ExactMatchResult(2 / len(examples), 2, len(examples), ["?"] * len(examples))

    monkeypatch.setattr(callbacks, "exact_match", fake_exact_match)
    # Rank 1 of 2; the other rank decoded 8 examples and got 3 right.
    strategy = types.SimpleNamespace(rank=1, world_size=2, sum=lambda values: [values[0] + 3, values[1] + 8])
    trainer = types.SimpleNamespace(strategy=strategy, model=None, device="cpu")
    evaluator = callbacks.ExactMatchEvaluator(list(range(15)), tokenizer=None, batch_size=4, max_new_tokens=2)
    assert evaluator.measure(trainer) == (2 + 3) / (7 + 8)
    assert decoded == [[1, 3, 5, 7, 9, 11, 13]]  # every second example, from this rank's index


def test_one_process_decodes_every_example(monkeypatch):
    decoded = []

    def fake_exact_match(model, examples, tokenizer, **kwargs):
        decoded.append(list(examples))
        return ExactMatchResult(1.0, len(examples), len(examples), ["?"] * len(examples))

    monkeypatch.setattr(callbacks, "exact_match", fake_exact_match)
    strategy = types.SimpleNamespace(rank=0, world_size=1, sum=lambda values: values)
    trainer = types.SimpleNamespace(strategy=strategy, model=None, device="cpu")
    evaluator = callbacks.ExactMatchEvaluator(list(range(5)), tokenizer=None, batch_size=4, max_new_tokens=2)
    assert evaluator.measure(trainer) == 1.0 and decoded == [[0, 1, 2, 3, 4]]

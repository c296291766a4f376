"""Fine-tuning callbacks under torchrun: each model replica decodes its share of the examples; the shares add up."""

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
    strategy = types.SimpleNamespace(
        replica=1, replicas=2, sum=lambda values: [values[0] + 3, values[1] + 8], agree_to_stop=bool
    )
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
    strategy = types.SimpleNamespace(replica=0, replicas=1, sum=lambda values: values, agree_to_stop=bool)
    trainer = types.SimpleNamespace(strategy=strategy, model=None, device="cpu")
    evaluator = callbacks.ExactMatchEvaluator(list(range(5)), tokenizer=None, batch_size=4, max_new_tokens=2)
    assert evaluator.measure(trainer) == 1.0 and decoded == [[0, 1, 2, 3, 4]]


def test_the_ranks_of_an_expert_parallel_replica_decode_the_same_examples(monkeypatch):
    decoded = []

    def fake_exact_match(model, examples, tokenizer, **kwargs):
        decoded.append(list(examples))
        return ExactMatchResult(0.4, 2, 5, ["?"] * 5)

    monkeypatch.setattr(callbacks, "exact_match", fake_exact_match)
    # Rank 1 of 2 in one expert-parallel group: one replica, so this rank decodes every example, as rank 0 does;
    # the sum over both ranks counts each example twice, in the right answers and the total alike.
    strategy = types.SimpleNamespace(
        rank=1,
        world_size=2,
        replica=0,
        replicas=1,
        agree_to_stop=bool,
        sum=lambda values: [2 * value for value in values],
    )
    trainer = types.SimpleNamespace(strategy=strategy, model=None, device="cpu")
    evaluator = callbacks.ExactMatchEvaluator(list(range(5)), tokenizer=None, batch_size=4, max_new_tokens=2)
    assert evaluator.measure(trainer) == 0.4 and decoded == [[0, 1, 2, 3, 4]]

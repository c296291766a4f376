"""Batch formats of both objectives, and the stream's determinism and exact resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from switchformer.data import IGNORE_INDEX, Batcher, BatchStream, CorpusError, Objective, fixed_batches

from .test_span_corruption import reconstruct

SENTINELS = np.arange(999, 979, -1)
EOS = 1


def make_batcher(objective: Objective, sequence_length: int = 16) -> Batcher:
    return Batcher(objective=objective, sequence_length=sequence_length, pad_id=0, eos_id=EOS, sentinel_ids=SENTINELS)


def make_tokens(count: int = 1000) -> np.ndarray:
    return (np.arange(count) % 500 + 10).astype(np.uint16)  # ids 10..509: no pad, eos or sentinel


def take(stream: BatchStream, count: int) -> list[dict[str, torch.Tensor]]:
    return [next(stream) for _ in range(count)]


def assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_span_corruption_batch_format():
    batcher = make_batcher(Objective.SPAN_CORRUPTION)
    stream = BatchStream(make_tokens(), batcher=batcher, batch_size=4, seed=0)
    batch = next(stream)
    assert batcher.chunk_length == 17 and batcher.targets_length == 5  # compute_input_and_target_lengths(16)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 16)
    assert batch["labels"].shape == (4, 5)
    assert all(t.dtype == torch.int64 for t in batch.values())
    assert batch["attention_mask"].all()  # full chunks: no padding at all
    assert (batch["input_ids"][:, -1] == EOS).all() and (batch["labels"][:, -1] == EOS).all()
    assert (batch["labels"][:, 0] == SENTINELS[0]).all()


def test_causal_lm_batch_format():
    stream = BatchStream(make_tokens(), batcher=make_batcher(Objective.CAUSAL_LM), batch_size=4, seed=0)
    batch = next(stream)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, 16)
    assert torch.equal(batch["input_ids"], batch["labels"])  # the model shifts internally
    assert batch["input_ids"].dtype == torch.int64
    rows = batch["input_ids"]
    assert ((rows[:, 1:] - rows[:, :-1]) % 500 == 1).all()  # each row is a contiguous slice of the stream


def test_an_epoch_visits_every_chunk_once_and_the_next_reshuffles():
    tokens = np.arange(10, 10 + 16 * 12 + 5).astype(np.int64)  # 12 chunks of 16 and 5 spare tokens
    stream = BatchStream(tokens, batcher=make_batcher(Objective.CAUSAL_LM), batch_size=4, seed=7)
    assert stream.batches_per_epoch == 3
    epochs = [torch.cat([b["input_ids"] for b in take(stream, 3)]) for _ in range(3)]
    for rows in epochs:
        starts = sorted(rows[:, 0].tolist())
        offset = starts[0] - 10
        assert 0 <= offset <= 5
        assert starts == [10 + offset + 16 * i for i in range(12)]  # every chunk exactly once
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert stream.epoch == 2


@pytest.mark.parametrize("objective", list(Objective))
@pytest.mark.parametrize("consumed", [0, 3, 4, 7])  # mid-epoch, exactly at the epoch boundary, past it
def test_resumed_stream_yields_exactly_the_uninterrupted_batches(objective, consumed):
    batcher = make_batcher(objective)
    uninterrupted = BatchStream(make_tokens(300), batcher=batcher, batch_size=4, seed=11)
    assert uninterrupted.batches_per_epoch == 4
    take(uninterrupted, consumed)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # what a checkpoint stores
    expected = take(uninterrupted, 6)

    resumed = BatchStream(make_tokens(300), batcher=batcher, batch_size=4, seed=11)
    resumed.load_state_dict(state)
    assert resumed.batches_yielded == consumed
    assert_same(take(resumed, 6), expected)
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_streams_are_deterministic_and_seeded():
    batcher = make_batcher(Objective.SPAN_CORRUPTION)
    a, b, c = (BatchStream(make_tokens(), batcher=batcher, batch_size=4, seed=s) for s in (1, 1, 2))
    assert_same(take(a, 5), take(b, 5))
    assert not torch.equal(next(a)["input_ids"], next(c)["input_ids"])


def test_state_from_other_data_or_settings_is_refused():
    batcher = make_batcher(Objective.CAUSAL_LM)
    state = BatchStream(make_tokens(), batcher=batcher, batch_size=4, seed=0).state_dict()
    with pytest.raises(ValueError, match="fingerprint"):
        BatchStream(make_tokens(1200), batcher=batcher, batch_size=4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(make_tokens(), batcher=batcher, batch_size=2, seed=0).load_state_dict(state)


def test_too_little_data_for_one_batch_is_a_clear_error():
    with pytest.raises(CorpusError, match=r"fewer than one batch needs \(4 x 16 = 64\)"):
        BatchStream(make_tokens(63), batcher=make_batcher(Objective.CAUSAL_LM), batch_size=4, seed=0)


def test_validation_batches_are_fixed_and_pad_the_tail():
    batcher = make_batcher(Objective.SPAN_CORRUPTION)
    tokens = make_tokens(17 * 5 + 6)  # five full chunks and a 6-token tail
    batches = fixed_batches(tokens, batcher=batcher, batch_size=4, max_batches=3, seed=0)
    assert_same(batches, fixed_batches(tokens, batcher=batcher, batch_size=4, max_batches=3, seed=0))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    tail = batches[-1]
    inputs, mask, labels = tail["input_ids"][-1], tail["attention_mask"][-1], tail["labels"][-1]
    real = int(mask.sum())
    assert real < 16 and (inputs[real:] == 0).all() and not mask[real:].any()
    kept = labels[labels != IGNORE_INDEX].numpy()
    assert reconstruct(inputs[:real].numpy(), kept, SENTINELS) == tokens[-6:].tolist()
    assert len(fixed_batches(tokens, batcher=batcher, batch_size=4, max_batches=1, seed=0)) == 1

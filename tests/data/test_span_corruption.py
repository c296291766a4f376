"""T5 span corruption: lengths worked by hand, noise fraction, sentinel order, exact reconstruction."""

from __future__ import annotations

import numpy as np
import pytest

from switchformer.data import (
    compute_input_and_target_lengths,
    noise_span_to_unique_sentinel,
    nonnoise_span_to_unique_sentinel,
    random_spans_noise_mask,
    span_corrupt,
)
from switchformer.data.span_corruption import noise_span_counts

EOS = 1
SENTINELS = np.arange(999, 899, -1)  # <extra_id_i> = 999 - i, as T5 (the highest id is sentinel 0)


def reconstruct(inputs: np.ndarray, targets: np.ndarray, sentinels: np.ndarray = SENTINELS) -> list[int]:
    """The slow, obvious inverse: put each sentinel's target span back where the sentinel sits in the input."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    index_of = {int(s): i for i, s in enumerate(sentinels)}
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets[:-1].tolist():
        if token in index_of:
            current = index_of[token]
            spans[current] = []
        else:
            assert current is not None, "targets must start with a sentinel"
            spans[current].append(token)
    out: list[int] = []
    for token in inputs[:-1].tolist():
        out.extend(spans[index_of[token]] if token in index_of else [token])
    return out


def sentinels_in(row: np.ndarray) -> list[int]:
    return [int(t) for t in row if t in set(SENTINELS.tolist())]


@pytest.mark.parametrize(
    ("inputs_length", "expected"),
    [
        (512, (568, 114)),  # T5's own numbers: 85 noise tokens in 28 spans -> 483 + 28 + 1 and 85 + 28 + 1
        (256, (284, 58)),  # 43 noise in round(43 / 3) = 14 spans -> 241 + 14 + 1 = 256 and 43 + 14 + 1 = 58
        (10, (10, 4)),  # 2 noise in 1 span -> 8 + 1 + 1 = 10 and 2 + 1 + 1 = 4 (285 -> 11 inputs would not fit)
    ],
)
def test_lengths_match_values_worked_by_hand(inputs_length, expected):
    assert tuple(compute_input_and_target_lengths(inputs_length, 0.15, 3.0)) == expected


@pytest.mark.parametrize("inputs_length", [4, 7, 16, 33, 100, 128, 200, 256, 384, 512, 1000])
@pytest.mark.parametrize(("density", "mean"), [(0.15, 3.0), (0.3, 2.5), (0.5, 3.0)])
def test_full_chunks_give_exactly_the_computed_lengths(inputs_length, density, mean):
    tokens_length, targets_length = compute_input_and_target_lengths(inputs_length, density, mean)
    rng = np.random.default_rng(inputs_length)
    for _ in range(5):
        out = span_corrupt(
            rng.integers(10, 800, tokens_length),
            rng=rng,
            sentinel_ids=np.arange(5000, 4000, -1),
            eos_id=EOS,
            noise_density=density,
            mean_noise_span_length=mean,
        )
        assert len(out.inputs) == inputs_length
        assert len(out.targets) == targets_length


def test_impossible_lengths_raise_instead_of_padding():
    with pytest.raises(ValueError, match="exactly 4 input tokens"):
        compute_input_and_target_lengths(4, 0.5, 1.0)


def test_noise_fraction_span_count_and_layout():
    tokens_length = 568
    for seed in range(20):
        mask = random_spans_noise_mask(tokens_length, 0.15, 3.0, np.random.default_rng(seed))
        starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
        assert mask.sum() == 85  # round(568 * 0.15): the fraction is exact, not just on average
        assert len(starts) == 28  # round(85 / 3) spans
        assert not mask[0] and mask[-1]  # T5 layout: non-noise first, noise last


def test_mean_span_length_is_about_the_requested_one():
    lengths = []
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = random_spans_noise_mask(284, 0.15, 3.0, rng)
        edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
        lengths.extend(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
    assert min(lengths) >= 1
    assert np.mean(lengths) == pytest.approx(43 / 14)  # every mask has 43 noise tokens in 14 spans


def test_sentinel_replacement_worked_by_hand():
    tokens = np.arange(10, 18)  # a b c d e f g h
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1], dtype=bool)  # noise: c d, h
    assert noise_span_to_unique_sentinel(tokens, mask, SENTINELS).tolist() == [10, 11, 999, 14, 15, 16, 998]
    assert nonnoise_span_to_unique_sentinel(tokens, mask, SENTINELS).tolist() == [999, 12, 13, 998, 17]


def test_sentinels_appear_in_order_and_the_original_is_reconstructed():
    rng = np.random.default_rng(1)
    for length in [1, 2, 3, 5, 10, 57, 284, 568]:
        tokens = rng.integers(10, 800, length)
        out = span_corrupt(tokens, rng=rng, sentinel_ids=SENTINELS, eos_id=EOS)
        spans = len(sentinels_in(out.inputs))
        assert sentinels_in(out.inputs) == SENTINELS[:spans].tolist()  # <extra_id_0>, <extra_id_1>, ...
        assert sentinels_in(out.targets) == SENTINELS[: len(sentinels_in(out.targets))].tolist()
        assert out.targets[0] == SENTINELS[0]
        assert reconstruct(out.inputs, out.targets) == tokens.tolist()


def test_same_generator_seed_gives_the_same_corruption():
    tokens = np.arange(10, 294)
    a = span_corrupt(tokens, rng=np.random.default_rng([3, 1]), sentinel_ids=SENTINELS, eos_id=EOS)
    b = span_corrupt(tokens, rng=np.random.default_rng([3, 1]), sentinel_ids=SENTINELS, eos_id=EOS)
    c = span_corrupt(tokens, rng=np.random.default_rng([3, 2]), sentinel_ids=SENTINELS, eos_id=EOS)
    assert a.inputs.tolist() == b.inputs.tolist() and a.targets.tolist() == b.targets.tolist()
    assert a.inputs.tolist() != c.inputs.tolist()


def test_too_few_sentinels_is_an_error_not_a_silent_wrap():
    with pytest.raises(ValueError, match="more sentinels"):
        span_corrupt(np.arange(10, 294), rng=np.random.default_rng(0), sentinel_ids=SENTINELS[:3], eos_id=EOS)


def test_empty_chunk_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        span_corrupt(np.zeros(0, np.int64), rng=np.random.default_rng(0), sentinel_ids=SENTINELS, eos_id=EOS)


def test_a_huge_sequence_length_is_answered_at_once_and_exactly():
    # T5's one-token-at-a-time search would take minutes here (a typo in a config file hung validation).
    tokens_length, targets_length = compute_input_and_target_lengths(2**31)
    noise, spans = noise_span_counts(tokens_length, 0.15, 3.0)
    assert tokens_length - noise + spans + 1 == 2**31 and noise + spans + 1 == targets_length
    next_noise, next_spans = noise_span_counts(tokens_length + 1, 0.15, 3.0)
    assert tokens_length + 1 - next_noise + next_spans + 1 > 2**31  # the largest chunk that fits


def test_a_noise_density_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="noise_density"):
        compute_input_and_target_lengths(512, noise_density=1.0)

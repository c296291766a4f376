"""T5 span corruption (Raffel et al. 2020, section 3.1.4), the Switch Transformer's pre-training objective.

A chunk of raw tokens is split into alternating non-noise and noise spans (non-noise first). The input keeps the
non-noise tokens and replaces each noise span by one sentinel (``<extra_id_0>`` for the first, then 1, 2, ...);
the target lists each sentinel followed by the span it replaced; both end with eos::

    tokens   a b c d e f g h            (noise: c d, h)
    inputs   a b <0> e f g <1> </s>
    targets  <0> c d <1> h </s>

This follows T5's ``random_spans_noise_mask`` / ``noise_span_to_unique_sentinel`` semantics (about
``noise_density`` of the tokens are noise, in ``round(noise / mean_noise_span_length)`` spans whose lengths are a
uniformly random composition), written here with numpy ``Generator``s. One function computes the span counts for
both the lengths helper and the mask, so chunks of ``tokens_length`` raw tokens give inputs and targets of exactly
the computed lengths: nothing is truncated or padded by surprise.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np


class SpanCounts(NamedTuple):
    noise_tokens: int
    noise_spans: int  # also the number of non-noise spans (they alternate, non-noise first)


class SpanLengths(NamedTuple):
    tokens_length: int  # raw tokens per chunk
    targets_length: int  # target tokens (sentinels, noise, eos) per chunk


@dataclasses.dataclass(frozen=True)
class CorruptedSpans:
    """One example: int64 arrays ``inputs`` [non-noise + spans + 1] and ``targets`` [noise + spans + 1]."""

    inputs: np.ndarray
    targets: np.ndarray


def noise_span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> SpanCounts:
    """How many noise tokens and spans a chunk of ``length`` tokens gets (T5's rounding and its degeneracy guards).

    Lengths below 2 are treated as 2 (the mask is cut back afterwards), there is at least one noise and one
    non-noise token, and at least one span. Spans are also capped by the non-noise tokens, which T5 leaves to
    crash for extreme densities.
    """
    length = max(length, 2)
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = max(round(noise / mean_noise_span_length), 1)
    return SpanCounts(noise, min(spans, noise, length - noise))


def compute_input_and_target_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> SpanLengths:
    """The raw chunk length whose corrupted input is exactly ``inputs_length`` tokens, and the target length.

    T5's ``random_spans_helper``: the largest ``tokens_length`` with ``non-noise + spans + 1 <= inputs_length``.
    For example ``inputs_length=512`` gives ``(568, 114)``: 85 noise tokens in 28 spans, 483 + 28 + 1 = 512 input
    tokens and 85 + 28 + 1 = 114 targets.
    """

    def lengths(tokens_length: int) -> tuple[int, int]:
        noise, spans = noise_span_counts(tokens_length, noise_density, mean_noise_span_length)
        return tokens_length - noise + spans + 1, noise + spans + 1

    if inputs_length < 3:
        raise ValueError(f"inputs_length={inputs_length} is too short for span corruption (need >= 3)")
    if not 0 < noise_density < 1:
        raise ValueError(f"noise_density={noise_density} must be in (0, 1)")
    # The input length never falls as tokens_length grows (non-noise tokens and spans each grow by 0 or 1 a token)
    # and grows without bound, so the largest fit is found by doubling then bisecting: T5 steps one token at a
    # time, which takes minutes for a sequence length in the billions (a typo in a config file).
    tokens_length, too_long = inputs_length - 1, inputs_length  # lengths(inputs_length - 1)[0] <= inputs_length
    while lengths(too_long)[0] <= inputs_length:
        tokens_length, too_long = too_long, 2 * too_long
    while too_long - tokens_length > 1:
        middle = (tokens_length + too_long) // 2
        if lengths(middle)[0] <= inputs_length:
            tokens_length = middle
        else:
            too_long = middle
    got_inputs, targets_length = lengths(tokens_length)
    if got_inputs != inputs_length:  # only for degenerate settings; the step in input length is 0 or 1 otherwise
        raise ValueError(
            f"no chunk length gives exactly {inputs_length} input tokens at noise_density={noise_density}, "
            f"mean_noise_span_length={mean_noise_span_length}; choose another sequence length"
        )
    return SpanLengths(tokens_length, targets_length)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of ``num_items`` items into ``num_segments`` non-empty segments."""
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean [length] mask, True = noise: alternating non-noise/noise spans, starting with non-noise."""
    padded = max(length, 2)
    noise, spans = noise_span_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(noise, spans, rng)
    nonnoise_lengths = _random_segmentation(padded - noise, spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    is_noise = np.tile(np.array([False, True]), spans)
    return np.repeat(is_noise, interleaved)[:length]


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: np.ndarray) -> np.ndarray:
    """Replace each noise span by the next sentinel (``sentinel_ids[0]`` first) and drop the rest of the span."""
    previous = np.concatenate([[False], noise_mask[:-1]])
    first = noise_mask & ~previous
    num_spans = int(first.sum())
    if num_spans > len(sentinel_ids):
        raise ValueError(
            f"{num_spans} noise spans need more sentinels than the tokenizer has ({len(sentinel_ids)}); "
            "use a shorter sequence length or more sentinels"
        )
    out = np.asarray(tokens, dtype=np.int64).copy()
    out[first] = sentinel_ids[:num_spans]
    return out[~(noise_mask & previous)]


def nonnoise_span_to_unique_sentinel(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: np.ndarray
) -> np.ndarray:
    """The targets' view: non-noise spans become sentinels, so each sentinel is followed by its noise span."""
    return noise_span_to_unique_sentinel(tokens, ~noise_mask, sentinel_ids)


def span_corrupt(
    tokens: np.ndarray,
    *,
    rng: np.random.Generator,
    sentinel_ids: np.ndarray,
    eos_id: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> CorruptedSpans:
    """Corrupt one chunk of raw token ids into T5 inputs and targets, each followed by ``eos_id``."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size == 0:
        raise ValueError("cannot corrupt an empty chunk of tokens")
    mask = random_spans_noise_mask(tokens.size, noise_density, mean_noise_span_length, rng)
    eos = np.array([eos_id], dtype=np.int64)
    inputs = np.concatenate([noise_span_to_unique_sentinel(tokens, mask, sentinel_ids), eos])
    targets = np.concatenate([nonnoise_span_to_unique_sentinel(tokens, mask, sentinel_ids), eos])
    return CorruptedSpans(inputs, targets)

"""Training objectives: how chunks of raw tokens become a batch of model inputs and labels.

Span corruption (T5, the paper's pre-training task) feeds the encoder-decoder; next-token prediction feeds the
decoder-only model. Both return the same keys, all int64 tensors:

* ``input_ids`` [B, sequence_length], ``attention_mask`` [B, sequence_length] (1 = real token, 0 = padding)
* ``labels`` [B, targets_length] for span corruption, [B, sequence_length] for the LM (the model shifts them).

Padding only ever occurs in a short final validation chunk: ``pad_id`` in the inputs, ``-100`` (ignored by the
loss) in the labels.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

import numpy as np
import torch

from switchformer.data.span_corruption import SpanLengths, compute_input_and_target_lengths, span_corrupt
from switchformer.labels import IGNORE_INDEX


class Objective(enum.Enum):
    SPAN_CORRUPTION = "span-corruption"  # encoder-decoder; T5 / Switch pre-training
    CAUSAL_LM = "causal-lm"  # decoder-only next-token prediction


@dataclasses.dataclass(frozen=True, eq=False)
class Batcher:
    """Turns chunks of :attr:`chunk_length` raw tokens (and one RNG seed per chunk) into a batch dict."""

    objective: Objective
    sequence_length: int
    pad_id: int
    eos_id: int
    sentinel_ids: np.ndarray  # int64 [num_sentinels], sentinel_ids[i] = <extra_id_i>
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0

    @property
    def chunk_length(self) -> int:
        """Raw tokens per example: more than ``sequence_length`` for span corruption (the noise leaves the input)."""
        if self.objective is Objective.CAUSAL_LM:
            return self.sequence_length
        return self._span_lengths().tokens_length

    @property
    def targets_length(self) -> int:
        if self.objective is Objective.CAUSAL_LM:
            return self.sequence_length
        return self._span_lengths().targets_length

    def _span_lengths(self) -> SpanLengths:  # a short loop; recomputing beats caching on a frozen dataclass
        return compute_input_and_target_lengths(self.sequence_length, self.noise_density, self.mean_noise_span_length)

    def make_batch(self, chunks: Sequence[np.ndarray], seeds: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """One example per chunk; ``seeds[i]`` seeds the noise of chunk ``i`` (ignored by the LM objective)."""
        if len(chunks) != len(seeds):
            raise ValueError(f"got {len(chunks)} chunks but {len(seeds)} seeds")
        if self.objective is Objective.CAUSAL_LM:
            inputs = [np.asarray(chunk, dtype=np.int64) for chunk in chunks]
            labels = inputs
        else:
            corrupted = [
                span_corrupt(
                    chunk,
                    rng=np.random.default_rng(list(seed)),
                    sentinel_ids=self.sentinel_ids,
                    eos_id=self.eos_id,
                    noise_density=self.noise_density,
                    mean_noise_span_length=self.mean_noise_span_length,
                )
                for chunk, seed in zip(chunks, seeds, strict=True)
            ]
            inputs = [c.inputs for c in corrupted]
            labels = [c.targets for c in corrupted]
        input_ids = _pad(inputs, self.sequence_length, self.pad_id, "input")
        return {
            "input_ids": input_ids,
            "attention_mask": _pad([np.ones(len(x), np.int64) for x in inputs], self.sequence_length, 0, "mask"),
            "labels": _pad(labels, self.targets_length, IGNORE_INDEX, "label"),
        }


def _pad(rows: Sequence[np.ndarray], length: int, value: int, what: str) -> torch.Tensor:
    out = np.full((len(rows), length), value, dtype=np.int64)
    for i, row in enumerate(rows):
        if len(row) > length:  # cannot happen for chunks of chunk_length or shorter; guards against misuse
            raise ValueError(f"{what} row of {len(row)} tokens exceeds the batch length {length}")
        out[i, : len(row)] = row
    return torch.from_numpy(out)

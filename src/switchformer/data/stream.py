"""An endless, deterministic and resumable stream of training batches.

Each epoch cuts the packed token stream into chunks starting at a random offset (so chunk boundaries move between
epochs) and visits the chunks in a random order; both come from ``(seed, epoch)`` alone, and the span-corruption
noise of a chunk from ``(seed, epoch, chunk)``. The position is therefore just ``(epoch, batch)``:
:meth:`BatchStream.state_dict` is a small JSON-able dict, and a stream restored from it yields exactly the batches
the uninterrupted stream would have yielded (the trainer's ``--resume`` depends on this).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from switchformer.data.objectives import Batcher
from switchformer.data.packing import split_into_chunks
from switchformer.data.sources import CorpusError

# Distinct seed streams, so the shuffle of an epoch and the noise of its chunks never share random numbers.
SHUFFLE_STREAM = 0
NOISE_STREAM = 1
VALIDATION_STREAM = 2


def stream_fingerprint(tokens: np.ndarray) -> str:
    """A short hash of the token stream, stored in the state so a state from other data is refused."""
    return hashlib.blake2b(np.ascontiguousarray(tokens).tobytes(), digest_size=8).hexdigest()


class BatchStream:
    """Yields batch dicts (see :mod:`switchformer.data.objectives`) forever, epoch after epoch."""

    def __init__(self, tokens: np.ndarray, *, batcher: Batcher, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._tokens = tokens
        self._batcher = batcher
        self._batch_size = batch_size
        self._seed = seed
        self._chunk_length = batcher.chunk_length
        self._chunks_per_epoch = len(tokens) // self._chunk_length
        self._batches_per_epoch = self._chunks_per_epoch // batch_size
        if self._batches_per_epoch == 0:
            needed = batch_size * self._chunk_length
            raise CorpusError(
                f"the training split has {len(tokens)} tokens, fewer than one batch needs ({batch_size} x "
                f"{self._chunk_length} = {needed}); use a larger corpus or a smaller batch_size or sequence_length"
            )
        self._fingerprint = stream_fingerprint(tokens)
        self._epoch = 0
        self._batch = 0  # index within the epoch of the next batch
        self._plan: tuple[int, int, np.ndarray] | None = None  # (epoch, offset, chunk order), cached

    # -- iteration ------------------------------------------------------------------------------------
    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._batch >= self._batches_per_epoch:
            self._epoch += 1
            self._batch = 0
        offset, order = self._epoch_plan(self._epoch)
        chunks = split_into_chunks(self._tokens, self._chunk_length, offset=offset).full
        picked = order[self._batch * self._batch_size : (self._batch + 1) * self._batch_size]
        seeds = [(self._seed, NOISE_STREAM, self._epoch, int(i)) for i in picked]
        batch = self._batcher.make_batch([chunks[i] for i in picked], seeds)
        self._batch += 1
        return batch

    def _epoch_plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """The epoch's chunk offset (within the tokens left over by whole chunks) and chunk order."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self._seed, SHUFFLE_STREAM, epoch])
            slack = len(self._tokens) - self._chunks_per_epoch * self._chunk_length
            offset = int(rng.integers(0, slack + 1))
            self._plan = (epoch, offset, rng.permutation(self._chunks_per_epoch))
        return self._plan[1], self._plan[2]

    # -- position -------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the last yielded batch came from (0 before any batch)."""
        return self._epoch

    @property
    def batches_per_epoch(self) -> int:
        return self._batches_per_epoch

    @property
    def batches_yielded(self) -> int:
        return self._epoch * self._batches_per_epoch + self._batch

    @property
    def tokens_per_epoch(self) -> int:
        """Raw tokens consumed per epoch (chunks left over by whole batches are skipped that epoch)."""
        return self._batches_per_epoch * self._batch_size * self._chunk_length

    def state_dict(self) -> dict[str, Any]:
        """The position and what it is valid for; JSON-able."""
        return {
            "epoch": self._epoch,
            "batch": self._batch,
            "seed": self._seed,
            "batch_size": self._batch_size,
            "chunk_length": self._chunk_length,
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state saved for other data, seed, batch size or chunk length."""
        expected = self.state_dict()
        for key in ("seed", "batch_size", "chunk_length", "fingerprint"):
            if state.get(key) != expected[key]:
                raise ValueError(
                    f"cannot resume the data stream: saved {key}={state.get(key)!r} but this stream has "
                    f"{key}={expected[key]!r}; resume with the data settings the run started with"
                )
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= self._batches_per_epoch:
            raise ValueError(f"invalid data stream position epoch={epoch}, batch={batch}")
        self._epoch, self._batch = epoch, batch


def fixed_batches(
    tokens: np.ndarray, *, batcher: Batcher, batch_size: int, max_batches: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Validation batches: chunks in stream order (the short tail padded, not dropped), noise seeded per chunk.

    The list is the same on every call, so validation losses are comparable across steps and runs. The last
    batch may hold fewer than ``batch_size`` rows when the validation split is small.
    """
    parts = split_into_chunks(tokens, batcher.chunk_length)
    chunks = list(parts.full[: max_batches * batch_size])
    if len(parts.remainder) and len(chunks) < max_batches * batch_size:
        chunks.append(parts.remainder)
    batches = []
    for start in range(0, len(chunks), batch_size):
        group = chunks[start : start + batch_size]
        seeds = [(seed, VALIDATION_STREAM, start + i) for i in range(len(group))]
        batches.append(batcher.make_batch(group, seeds))
    return batches

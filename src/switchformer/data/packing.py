"""Packing: tokenised documents concatenated into one stream (each followed by eos) and cut into fixed chunks.

Packing wastes no compute on padding (T5 and GPT both pre-train this way): a chunk may span the end of one
document and the start of the next, with the eos between them telling the model where the boundary is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Chunks:
    """Full chunks ``[num_chunks, length]`` (a view into the stream) and the leftover tail (possibly empty)."""

    full: np.ndarray
    remainder: np.ndarray


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned/int dtype that holds every id: uint16 halves memory and cache size for <= 65536 ids."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def pack_documents(documents: Iterable[Sequence[int]], *, eos_id: int, dtype: np.dtype) -> np.ndarray:
    """One 1-D array: ``doc_0 eos doc_1 eos ...``; empty documents contribute nothing (not even an eos)."""
    pieces: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=dtype)
    for ids in documents:
        if len(ids) == 0:
            continue
        pieces.append(np.asarray(ids, dtype=dtype))
        pieces.append(eos)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def split_into_chunks(tokens: np.ndarray, length: int, *, offset: int = 0) -> Chunks:
    """Cut ``tokens[offset:]`` into consecutive chunks of ``length``; no token is copied for the full chunks."""
    if length < 1:
        raise ValueError(f"chunk length must be >= 1, got {length}")
    if not 0 <= offset <= len(tokens):
        raise ValueError(f"offset {offset} outside a stream of {len(tokens)} tokens")
    rest = tokens[offset:]
    count = len(rest) // length
    return Chunks(rest[: count * length].reshape(count, length), rest[count * length :])

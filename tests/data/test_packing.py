"""Packing documents into one eos-separated stream and cutting fixed-length chunks."""

from __future__ import annotations

import numpy as np
import pytest

from switchformer.data import pack_documents, split_into_chunks, token_dtype


def test_documents_are_joined_with_eos_and_empty_ones_skipped():
    stream = pack_documents([[5, 6], [], [7], [8, 9, 10]], eos_id=1, dtype=np.dtype(np.uint16))
    assert stream.tolist() == [5, 6, 1, 7, 1, 8, 9, 10, 1]
    assert stream.dtype == np.uint16
    assert pack_documents([], eos_id=1, dtype=np.dtype(np.int32)).tolist() == []


def test_dtype_fits_the_vocabulary():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32


def test_chunks_are_views_with_a_remainder():
    tokens = np.arange(23)
    parts = split_into_chunks(tokens, 5, offset=2)
    assert parts.full.tolist() == [[2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [12, 13, 14, 15, 16], [17, 18, 19, 20, 21]]
    assert parts.remainder.tolist() == [22]
    assert np.shares_memory(parts.full, tokens)
    with pytest.raises(ValueError, match="offset"):
        split_into_chunks(tokens, 5, offset=24)

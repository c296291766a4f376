"""Property tests: arbitrary bytes, empty documents and huge lines go through reading, tokenising, packing and span
corruption without crashing and without losing a byte."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchformer.data import (
    compute_input_and_target_lengths,
    cut_long_documents,
    decode_utf8,
    pack_documents,
    span_corrupt,
    split_into_chunks,
)

from .test_span_corruption import reconstruct

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(raw=st.binary(max_size=2000))
def test_any_bytes_decode_and_round_trip_through_the_tokenizer(tokenizer, raw):
    text, replaced = decode_utf8(raw)
    assert (replaced == 0) == (text.encode("utf-8", errors="surrogatepass") == raw)
    assert 0 <= replaced <= len(raw)
    assert tokenizer.decode(tokenizer.encode(text)) == text


@FAST
@given(text=st.text(max_size=500))
def test_any_text_round_trips_exactly(tokenizer, text):
    ids = tokenizer.encode(text, add_eos=True)
    assert ids[-1] == tokenizer.eos_id and tokenizer.eos_id not in ids[:-1]
    assert tokenizer.decode(ids[:-1]) == text


@FAST
@given(
    documents=st.lists(
        st.one_of(st.just(""), st.text(max_size=200), st.text(alphabet="ab\n", min_size=3000, max_size=5000)),
        max_size=6,
    ),
    max_chars=st.integers(min_value=1, max_value=700),
)
def test_documents_survive_cutting_tokenising_and_packing(tokenizer, documents, max_chars):
    pieces = cut_long_documents(documents, max_chars)
    assert "".join(pieces) == "".join(documents)
    encoded = tokenizer.encode_batch(pieces)
    stream = pack_documents(encoded, eos_id=tokenizer.eos_id, dtype=np.dtype(np.uint16))
    ends = np.flatnonzero(stream == tokenizer.eos_id)  # text never encodes to eos, so these are the boundaries
    segments = np.split(stream, ends + 1)[:-1]
    assert [tokenizer.decode(segment[:-1].tolist()) for segment in segments] == [p for p in pieces if p]


@FAST
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    length=st.integers(min_value=1, max_value=700),
    density=st.sampled_from([0.05, 0.15, 0.3, 0.5]),
    mean=st.sampled_from([1.0, 2.0, 3.0, 5.0]),
)
def test_span_corruption_loses_nothing(seed, length, density, mean):
    sentinels = np.arange(10_000, 9_000, -1)
    tokens = np.random.default_rng(seed).integers(2, 5000, length)
    out = span_corrupt(
        tokens,
        rng=np.random.default_rng(seed),
        sentinel_ids=sentinels,
        eos_id=1,
        noise_density=density,
        mean_noise_span_length=mean,
    )
    assert reconstruct(out.inputs, out.targets, sentinels) == tokens.tolist()


@FAST
@given(inputs_length=st.integers(min_value=8, max_value=1500), extra=st.integers(min_value=0, max_value=3000))
def test_packed_chunks_always_fill_the_inputs_exactly(inputs_length, extra):
    tokens_length, targets_length = compute_input_and_target_lengths(inputs_length)
    stream = np.arange(2, 2 + tokens_length * 2 + extra) % 3000 + 2
    chunks = split_into_chunks(stream, tokens_length).full
    sentinels = np.arange(10_000, 9_000, -1)
    for i, chunk in enumerate(chunks):
        out = span_corrupt(chunk, rng=np.random.default_rng(i), sentinel_ids=sentinels, eos_id=1)
        assert (len(out.inputs), len(out.targets)) == (inputs_length, targets_length)

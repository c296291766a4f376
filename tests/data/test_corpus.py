"""Cutting long documents and the train/validation split: lossless, deterministic, disjoint."""

from __future__ import annotations

from collections import Counter

import pytest

from switchformer.data import CorpusError, cut_long_documents, split_documents

from .conftest import make_documents


def test_cutting_is_lossless_and_prefers_line_breaks():
    long_doc = "".join(f"line {i:03d}\n" for i in range(100))  # 9 characters per line
    pieces = cut_long_documents([long_doc, "short"], 40)
    assert "".join(pieces[:-1]) == long_doc and pieces[-1] == "short"
    assert all(len(p) <= 40 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-1])  # every cut sits at a line break
    assert len(pieces[0]) == 36  # the last line break inside the first 40 characters


def test_a_huge_single_line_is_cut_where_it_is():
    pieces = cut_long_documents(["x" * 25], 10)
    assert pieces == ["x" * 10, "x" * 10, "x" * 5]


def test_split_is_deterministic_disjoint_and_complete():
    documents = make_documents(400)
    first = split_documents(documents, validation_fraction=0.1, seed=3)
    again = split_documents(documents, validation_fraction=0.1, seed=3)
    other = split_documents(documents, validation_fraction=0.1, seed=4)
    assert (first.train, first.validation) == (again.train, again.validation)
    assert not set(first.train) & set(first.validation)
    assert Counter(first.train) + Counter(first.validation) == Counter(documents)
    assert 20 <= len(first.validation) <= 60  # about 10% of 400
    assert set(other.validation) != set(first.validation)  # the seed matters


def test_split_does_not_depend_on_document_order():
    documents = make_documents(100)
    forward = split_documents(documents, validation_fraction=0.2, seed=0)
    backward = split_documents(documents[::-1], validation_fraction=0.2, seed=0)
    assert set(forward.validation) == set(backward.validation)


def test_duplicates_land_on_the_same_side():
    documents = make_documents(50) * 2
    split = split_documents(documents, validation_fraction=0.3, seed=0)
    assert not set(split.train) & set(split.validation)


def test_small_corpora_still_get_both_sides():
    assert len(split_documents(["a", "b"], validation_fraction=0.01, seed=0).validation) == 1
    assert len(split_documents(["a", "b"], validation_fraction=0.99, seed=0).train) == 1
    assert split_documents(["a"], validation_fraction=0.0, seed=0).train == ["a"]
    with pytest.raises(CorpusError, match="validation_fraction=0"):
        split_documents(["only one"], validation_fraction=0.1, seed=0)

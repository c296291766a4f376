"""Suite-wide guards."""

from __future__ import annotations

import pytest

from switchformer.training.denormals import denormals_are_flushed


@pytest.fixture(autouse=True)
def _no_test_leaves_denormals_flushed():
    """The flush-to-zero mode is process state that later tests read (Hypothesis refuses to run under it)."""
    yield
    assert not denormals_are_flushed(), "this test left denormals flushed on the main thread; use flushed_denormals()"

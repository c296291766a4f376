"""A Switch layer, when built, keeps freed host memory in the process unless the environment switches it off."""

from __future__ import annotations

import pytest

from switchformer import SwitchFFN, host_memory


@pytest.fixture
def calls(monkeypatch):
    seen: list[bool] = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: seen.append(True) or True)
    return seen


def test_building_a_switch_layer_keeps_freed_memory(calls, monkeypatch):
    monkeypatch.delenv(host_memory.ENVIRONMENT_SWITCH, raising=False)
    SwitchFFN(d_model=8, d_ff=16, num_experts=2)
    assert calls == [True]


@pytest.mark.parametrize(("value", "applied"), [("0", False), (" 0 ", False), ("1", True)])
def test_the_environment_switch_decides(calls, monkeypatch, value, applied):
    monkeypatch.setenv(host_memory.ENVIRONMENT_SWITCH, value)
    assert host_memory.apply_default() is applied
    SwitchFFN(d_model=8, d_ff=16, num_experts=2)
    assert calls == ([True, True] if applied else [])


def test_glibc_takes_the_setting_and_the_answer_is_cached():
    host_memory.keep_freed_memory.cache_clear()
    assert host_memory.keep_freed_memory() is True  # glibc on Linux, this suite's platform
    assert host_memory.keep_freed_memory.cache_info().hits == 0
    assert host_memory.keep_freed_memory() is True and host_memory.keep_freed_memory.cache_info().hits == 1

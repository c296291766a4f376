import subprocess
from pathlib import Path

import pytest

from switchformer.training import cpu_features
from switchformer.training.cpu_features import cpu_has_native_bf16, native_bf16_in_cpuinfo

ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx512f amx_tile amx_bf16 amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd atomics\n"


@pytest.fixture
def fresh_probe():
    """Forget the cached answer before and after, so a faked machine is asked and never outlives the test."""
    cpu_features.cpu_has_native_bf16.cache_clear()
    yield
    cpu_features.cpu_has_native_bf16.cache_clear()


def test_bf16_instruction_sets_are_recognised():
    assert native_bf16_in_cpuinfo(ZEN4)
    assert native_bf16_in_cpuinfo(SAPPHIRE_RAPIDS)
    assert native_bf16_in_cpuinfo(GRAVITON3)


def test_cpus_without_bf16_are_not():
    assert not native_bf16_in_cpuinfo(SKYLAKE)
    assert not native_bf16_in_cpuinfo(GRAVITON2)
    assert not native_bf16_in_cpuinfo("")


def test_a_flag_name_must_match_whole():
    assert not native_bf16_in_cpuinfo("flags\t\t: avx512_bf16x_not_a_flag\n")


def test_this_machine_is_read_from_its_cpuinfo(monkeypatch, fresh_probe):
    monkeypatch.setattr(cpu_features.platform, "system", lambda: "Linux")  # on a Mac too: the /proc/cpuinfo path
    cpuinfo = Path("/proc/cpuinfo")
    expected = native_bf16_in_cpuinfo(cpuinfo.read_text()) if cpuinfo.is_file() else False
    assert cpu_has_native_bf16() is expected


def _fake_macos(monkeypatch, *, returncode: int, stdout: str) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, returncode, stdout=stdout, stderr="")

    monkeypatch.setattr(cpu_features.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(cpu_features.subprocess, "run", run)
    return calls


@pytest.mark.parametrize(
    ("returncode", "stdout", "expected"),
    [(0, "1\n", True), (0, "0\n", False), (1, "", False)],  # M2 and later, M1, an Intel Mac (no such key)
)
def test_macos_asks_sysctl_for_arms_bf16_extension(monkeypatch, fresh_probe, returncode, stdout, expected):
    calls = _fake_macos(monkeypatch, returncode=returncode, stdout=stdout)
    assert cpu_features.cpu_has_native_bf16() is expected
    assert calls == [["sysctl", "-n", "hw.optional.arm.FEAT_BF16"]]

"""Whether this CPU computes bfloat16 natively, which decides whether bf16 autocast pays off on CPU.

Cores with bf16 dot-product instructions (x86 AVX512-BF16 or AMX, e.g. AMD Zen 4, Intel Cooper Lake and Sapphire
Rapids; Arm's BF16 extension) run oneDNN's bf16 matmuls at several times float32's rate, so a training step gets
faster (docs/results/compare-bf16/ against docs/results/compare-default/). Without them bf16 is converted in
software and may be slower than float32, so callers that default to bf16 on CPU check this first.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

_X86_FLAGS = {"avx512_bf16", "amx_bf16"}  # /proc/cpuinfo "flags" on x86
_ARM_FEATURES = {"bf16"}  # /proc/cpuinfo "Features" on aarch64


def native_bf16_in_cpuinfo(cpuinfo: str) -> bool:
    """Whether a ``/proc/cpuinfo`` text lists a bf16 instruction set (its first core's flags decide)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return bool(_X86_FLAGS & set(value.split()))
        if key.strip() == "Features":
            return bool(_ARM_FEATURES & set(value.split()))
    return False


def _macos_sysctl_bf16() -> bool:
    """Apple silicon reports Arm's BF16 extension as ``hw.optional.arm.FEAT_BF16`` (1 from M2 on); macOS has no
    /proc/cpuinfo. An Intel Mac or an older macOS lacks the key: sysctl fails and the answer is False."""
    try:
        found = subprocess.run(
            ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return found.returncode == 0 and found.stdout.strip() == "1"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this machine's CPU lists native bf16 instructions (/proc/cpuinfo on Linux, sysctl on macOS);
    False where it cannot tell."""
    if platform.system() == "Darwin":
        return _macos_sysctl_bf16()
    try:
        return native_bf16_in_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False

from __future__ import annotations

import subprocess
import sys

import pytest

# A denormal times one, on a tensor large enough that torch splits the work over its two intra-op threads;
# prints how many results stayed denormal (nonzero). ``SETUP`` runs first in a fresh interpreter.
PROBE = """
import torch
torch.set_num_threads(2)
{setup}
x = torch.full((1 << 22,), 1e-39)
print(int(((x * 1.0) != 0).sum()), torch.set_flush_denormal(True))
"""


def _denormal_results(setup: str) -> tuple[int, bool]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True, check=True)
    count, supported = out.stdout.splitlines()[-1].split()
    return int(count), supported == "True"


def test_without_the_flush_denormals_survive_a_multiplication():
    count, supported = _denormal_results("")
    assert count == 1 << 22, "control: torch keeps denormals by default"
    if not supported:
        pytest.skip("this CPU has no flush-to-zero mode (not x86); nothing to flush")


def test_the_command_line_flushes_denormals_on_every_intra_op_thread():
    count, supported = _denormal_results(
        "from switchformer.cli.main import main\nassert main(['info', 't5-tiny']) == 0"
    )
    assert count == (0 if supported else 1 << 22)


def test_the_flag_set_before_the_thread_pool_starts_reaches_its_threads():
    count, supported = _denormal_results(
        "from switchformer.training.denormals import flush_denormal_floats\nflush_denormal_floats()"
    )
    assert count == (0 if supported else 1 << 22)

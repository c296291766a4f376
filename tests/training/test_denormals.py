"""Denormals flushed to zero on CPU: on every intra-op thread under the command line, scoped in library calls."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from switchformer.training.denormals import denormals_are_flushed, flushed_denormals

# A denormal times one, on a tensor large enough that torch splits the work over its two intra-op threads;
# prints how many results stayed denormal (nonzero). ``SETUP`` runs first in a fresh interpreter.
PROBE = """
import torch
torch.set_num_threads(2)

def denormal_results():
    x = torch.full((1 << 22,), 1e-39)
    return int(((x * 1.0) != 0).sum())

{setup}
print(result, torch.set_flush_denormal(True))
"""


def _probe(setup: str) -> tuple[str, bool]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True, check=True)
    result, supported = out.stdout.splitlines()[-1].rsplit(" ", 1)
    return result, supported == "True"


def test_without_the_flush_denormals_survive_a_multiplication():
    result, supported = _probe("result = denormal_results()")
    assert int(result) == 1 << 22, "control: torch keeps denormals by default"
    if not supported:
        pytest.skip("this CPU has no flush-to-zero mode (not x86); nothing to flush")


def test_a_command_flushes_denormals_on_every_intra_op_thread_and_then_restores_the_caller():
    # The command's work is replaced by the probe: the first parallel op starts the pool inside the command.
    result, supported = _probe(
        "import switchformer.cli.main as cli\n"
        "from switchformer.training.denormals import denormals_are_flushed\n"
        "inside = []\n"
        "cli._run = lambda argv: inside.append(denormal_results()) or 0\n"
        "assert cli.main([]) == 0\n"
        "result = f'{inside[0]} {denormals_are_flushed()}'"
    )
    inside, flushed_after = result.split()
    assert int(inside) == (0 if supported else 1 << 22)
    assert flushed_after == "False", "main() gives the calling thread its mode back (it matters when called in-process)"


def test_the_flag_set_before_the_thread_pool_starts_reaches_its_threads():
    result, supported = _probe(
        "from switchformer.training.denormals import flushed_denormals\n"
        "with flushed_denormals():\n"
        "    result = denormal_results()"
    )
    assert int(result) == (0 if supported else 1 << 22)


def test_the_block_restores_the_mode_it_found():
    assert not denormals_are_flushed()
    with flushed_denormals() as supported:
        assert denormals_are_flushed() == supported
        assert (float(torch.tensor(1e-39) * 1.0) == 0.0) == supported, "torch's own ops on this thread agree"
        with flushed_denormals():
            pass
        assert denormals_are_flushed() == supported, "an inner block leaves the outer one's flush in place"
    assert not denormals_are_flushed()


def test_a_disabled_block_changes_nothing():
    with flushed_denormals(enabled=False) as supported:
        assert supported is False and not denormals_are_flushed()

"""The paper's initialisation: truncated normal weights whose measured std is ``sqrt(scale / fan_in)``."""

from __future__ import annotations

import math

import pytest
import torch

from switchformer.layers.initialization import TRUNCATED_NORMAL_STD, scaled_trunc_normal_


def test_the_correction_is_the_std_of_a_unit_normal_truncated_at_two():
    density, mass = math.exp(-2) / math.sqrt(2 * math.pi), math.erf(2 / math.sqrt(2))  # phi(2), P(|z| < 2)
    truncated_variance = 1 - 2 * 2 * density / mass
    assert math.isclose(TRUNCATED_NORMAL_STD, math.sqrt(truncated_variance), rel_tol=1e-12)


@pytest.mark.parametrize(("scale", "fan_in"), [(0.1, 768), (1.0, 512), (0.1, 4096)])
def test_measured_std_is_the_papers_on_a_large_tensor(scale, fan_in):
    weight = torch.empty(2048, 2048)
    scaled_trunc_normal_(weight, scale=scale, fan_in=fan_in, generator=torch.Generator().manual_seed(0))
    target = math.sqrt(scale / fan_in)
    assert float(weight.std()) == pytest.approx(target, rel=0.02)
    assert abs(float(weight.mean())) < 0.01 * target
    # Cut at two standard deviations of the normal drawn from, i.e. 2.27 target stds, and no further.
    bound = 2 * target / TRUNCATED_NORMAL_STD
    assert float(weight.abs().max()) <= bound and float(weight.abs().max()) > 0.99 * bound


def test_a_generator_makes_the_draw_reproducible():
    a, b = torch.empty(64, 32), torch.empty(64, 32)
    scaled_trunc_normal_(a, scale=0.1, fan_in=32, generator=torch.Generator().manual_seed(3))
    scaled_trunc_normal_(b, scale=0.1, fan_in=32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)

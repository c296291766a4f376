"""How closely two layouts of one training run can agree, from the arithmetic rather than from a measurement.

One process and several ranks add the same float32 terms in a different order (a gradient sums its tokens per rank,
then over ranks; the ranks' matmuls block differently), so their gradients agree to float32 rounding of those sums,
not bit for bit. What that does to the weights after a few optimizer steps depends on the optimizer:

- AdamW divides each gradient by its own running RMS: ``u = m_hat / (sqrt(v_hat) + eps)``. Where a gradient is near
  zero, a last-bit difference can change the sign or size of that element's update entirely, so two correct runs
  can differ in such an element by up to twice the largest step AdamW can take. That bound, and no tighter one, is
  what the arithmetic guarantees for the weights; gradients and losses are checked tightly instead.
- Adafactor divides by row and column means of ``g^2`` (not by the element's own ``|g|``), and its step size is the
  weight's RMS times the learning rate: a gradient that agrees to a relative ``r`` gives updates that agree to a few
  ``r``, so its weights stay as close as its gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Gradients summed over a few thousand float32 terms in another order: each partial sum rounds at 6e-8 relative,
# so the sums agree to about sqrt(n) * 6e-8 of their largest term; 1e-5 of a tensor's largest value covers n = 10^4
# with margin (measured 5e-6 on the expert-parallel train test).
GRADIENT_RTOL = 1e-5


def adam_ratio_bound(step: int, betas: tuple[float, float]) -> float:
    """The largest ``|m_hat / sqrt(v_hat)|`` AdamW can reach at ``step`` (1-based), whatever the gradients.

    By Cauchy-Schwarz, ``|m_t| <= (1 - b1) * sqrt(sum_k (b1^2 / b2)^k) * sqrt(v_t / (1 - b2))`` (k < t); with the
    bias corrections ``m_hat = m / (1 - b1^t)`` and ``v_hat = v / (1 - b2^t)`` that gives the bound returned. It is
    exactly 1 at step 1 (``m_hat / sqrt(v_hat) = sign(g)``) and stays near 1 for the first steps.
    """
    b1, b2 = betas
    if not (0 <= b1 < 1 and 0 < b2 < 1 and b1 * b1 < b2):
        raise ValueError(f"betas {betas} outside the bound's domain (b1^2 < b2)")
    geometric = sum((b1 * b1 / b2) ** k for k in range(step))
    return (1 - b1) / (1 - b1**step) * math.sqrt(geometric) * math.sqrt((1 - b2**step) / (1 - b2))


def adamw_drift_bound(lrs: Sequence[float], betas: tuple[float, float], *, weight_scale: float = 1.0) -> float:
    """How far one weight of two correct AdamW runs from the same start can drift apart after steps at ``lrs``.

    Each step moves a weight by ``lr_t * u_t`` with ``|u_t| <= adam_ratio_bound(t)``, and decoupled weight decay
    (``w *= 1 - lr * wd``) only shrinks a difference, so two runs differ by at most ``sum_t 2 * lr_t * bound_t``;
    plus one float32 rounding of the weight (``weight_scale``, its largest magnitude) per step.
    """
    steps = sum(2 * lr * adam_ratio_bound(t, betas) for t, lr in enumerate(lrs, start=1))
    return steps + len(lrs) * 2**-23 * weight_scale


def adafactor_drift_bound(lrs: Sequence[float], *, numel: int, weight_scale: float) -> float:
    """How far one weight of two correct Adafactor runs from the same start can drift apart after steps at ``lrs``.

    Each step adds an update of RMS at most ``lr * max(1e-3, RMS(w))`` (torch's relative step with ``d = 1``), so no
    element exceeds ``lr * max(1e-3, |w|max) * sqrt(numel)``; gradients agreeing to :data:`GRADIENT_RTOL` make the
    updates agree to three times that (the gradient, its row and its column means), and each step's sum may round
    to a neighbouring float32 (one ulp of the largest weight).
    """
    size = math.sqrt(numel) * max(1e-3, weight_scale)
    updates = sum(3 * GRADIENT_RTOL * lr * size for lr in lrs)
    return updates + len(lrs) * 2**-23 * weight_scale

"""The two caveats of capacity-limited routing that docs/routing-caveats.md describes, shown on tiny models, and the
warning that batch-prioritised routing in a decoder gives."""

from __future__ import annotations

import warnings

import pytest
import torch

from switchformer import ModelConfig, MoEConfig, build_model
from switchformer.moe.config import RoutingCaveatWarning

VOCAB = 61
SHAPE = {"vocab_size": VOCAB, "d_model": 32, "d_ff": 48, "num_heads": 4, "num_layers": 2}


def _model(architecture: str = "decoder-only", **moe_changes) -> torch.nn.Module:
    """Every FFN a Switch layer; in evaluation 2 slots per expert for 12 tokens of 4 experts: a third is dropped."""
    moe = MoEConfig(num_experts=4, eval_capacity_factor=0.5, min_capacity=1, router_jitter=0.0).replace(**moe_changes)
    config = ModelConfig(architecture=architecture, **SHAPE, dropout=0.0, sparse_every=1, moe=moe)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoutingCaveatWarning)
        return build_model(config).eval()


def _leak(model) -> float:
    """Largest change of positions 0..10's logits when only token 11 changes, relative to the largest logit."""
    ids = torch.randint(2, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits[:, :11]
        changes = []
        for token in range(2, VOCAB):
            other = ids.clone()
            other[0, 11] = token
            changes.append(float((model(other).logits[:, :11] - base).abs().max()))
    return max(changes) / float(base.abs().max())


def test_confidence_priority_with_a_binding_capacity_lets_later_tokens_change_earlier_outputs():
    assert _leak(_model(priority="confidence")) > 1e-2
    # Causal up to float rounding (a different batch of tokens in the experts' matmuls):
    assert _leak(_model(priority="position")) < 1e-6  # earlier tokens claim first
    assert _leak(_model(priority="confidence", dropless=True)) < 1e-6  # no capacity, no slot to take


def _warnings_when_built(architecture: str, *, times: int = 1, **changes) -> list[warnings.WarningMessage]:
    moe = MoEConfig(num_experts=4, priority="confidence").replace(**changes.pop("moe", {}))
    config = ModelConfig(architecture=architecture, **SHAPE, moe=moe, **changes)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(times):
            build_model(config)
    return [w for w in seen if issubclass(w.category, RoutingCaveatWarning)]


def test_confidence_priority_in_a_decoder_warns_once():
    seen = _warnings_when_built("decoder-only", times=3)
    assert len(seen) == 1 and "not causal" in str(seen[0].message) and "routing-caveats" in str(seen[0].message)
    assert len(_warnings_when_built("encoder-decoder")) == 1  # its decoder's Switch layers leak the same way


@pytest.mark.parametrize(
    "changes",
    [
        {"moe": {"priority": "position"}},
        {"moe": {"dropless": True}},
        {"decoder_sparse_layers": ()},  # only the bidirectional encoder routes by confidence
    ],
    ids=["position-priority", "dropless", "dense-decoder"],
)
def test_no_warning_where_routing_stays_causal(changes):
    assert _warnings_when_built("encoder-decoder", **changes) == []


def _incremental_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Cached decoding: each step routes one new token (a group of one, never dropped)."""
    with torch.no_grad():
        step = model(ids[:, :1], use_cache=True)
        logits = [step.logits[:, -1]]
        for t in range(1, ids.shape[1]):
            step = model(ids[:, t : t + 1], cache=step.cache, use_cache=True)
            logits.append(step.logits[:, -1])
    return torch.stack(logits, 1)


def test_cached_decoding_differs_from_a_full_forward_when_the_group_capacity_drops_tokens():
    ids = torch.randint(2, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    capped = _model()
    with torch.no_grad():
        full = capped(ids)
    assert min(float(r.stats.dropped_fraction) for r in full.router) > 0.2
    gap = float((_incremental_logits(capped, ids) - full.logits).abs().max())
    assert gap > 1e-2 * float(full.logits.abs().max())
    dropless = _model(dropless=True)
    with torch.no_grad():
        full = dropless(ids).logits
    torch.testing.assert_close(_incremental_logits(dropless, ids), full, atol=1e-5, rtol=1e-5)

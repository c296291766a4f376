"""Logits and hidden states match ``transformers`` on identical weights, including its token-drop pattern."""

from __future__ import annotations

import pytest
import torch

from tests.interop.hf_models import batch, ours_from_hf, tiny_hf

CASES = {
    "relu-tied-every-other": {},
    "relu-untied-every-layer-3-decoder-layers": {
        "tie_word_embeddings": False,
        "num_experts": 8,
        "num_sparse_encoder_layers": 2,
        "num_decoder_layers": 3,
        "num_sparse_decoder_layers": 3,
    },
    "gelu-d64-3-layers-router-bias": {
        "dense_act_fn": "gelu",
        "d_model": 64,
        "num_layers": 3,
        "num_decoder_layers": 3,
        "router_bias": True,
    },
    "dense": {"num_sparse_encoder_layers": 3, "num_sparse_decoder_layers": 3},  # step 0: no Switch layer
}


def _compare(hf_model, ours, ids, mask, dec):
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        decoder = hf_model.decoder(
            input_ids=dec, encoder_hidden_states=expected.encoder_last_hidden_state, encoder_attention_mask=mask
        )
        got = ours(ids, attention_mask=mask, decoder_input_ids=dec)
    torch.testing.assert_close(got.encoder_hidden_states, expected.encoder_last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.hidden_states, decoder.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
    return got


@pytest.mark.parametrize("changes", CASES.values(), ids=CASES.keys())
def test_logits_and_hidden_states_match_transformers(changes):
    hf_model = tiny_hf(**changes)
    ours = ours_from_hf(hf_model)
    assert (ours.config.moe is None) == (changes.get("num_sparse_encoder_layers") == 3)
    got = _compare(hf_model, ours, *batch())
    assert all(float(r.stats.dropped_fraction) == 0 for r in got.router)  # capacity 64: nothing dropped


def test_small_fixed_capacity_drops_the_same_tokens_as_transformers():
    """HF's capacity is per sequence, in position order; grouping='sequence' reproduces which tokens it drops."""
    hf_model = tiny_hf(expert_capacity=2, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)
    ours = ours_from_hf(hf_model)
    assert ours.config.moe.grouping.value == "sequence" and ours.config.moe.expert_capacity == 2
    got = _compare(hf_model, ours, *batch(src=12, tgt=9))
    dropped = [float(r.stats.dropped_fraction) for r in got.router]
    assert min(dropped) > 0.2, dropped  # 12 tokens, 4 experts x 2 slots: at least a third is dropped


def test_padding_is_routed_like_transformers_does():
    """HF routes padding tokens (it does not apply router_ignore_padding_tokens); they take capacity slots."""
    hf_model = tiny_hf(expert_capacity=1)
    ours = ours_from_hf(hf_model)
    assert ours.config.moe.ignore_padding_tokens is False
    ids, mask, dec = batch()
    _compare(hf_model, ours, ids, mask, dec)

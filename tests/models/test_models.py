"""The encoder-decoder and decoder-only models: structure, losses, precision, masks and the KV cache."""

from __future__ import annotations

import pytest
import torch

from switchformer import MoEConfig, SwitchLM, SwitchTransformer, build_model
from switchformer.layers.feed_forward import DenseFFN
from switchformer.models.base import token_cross_entropy
from switchformer.moe.layer import SwitchFFN

ARCHS = ["encoder-decoder", "decoder-only"]


def _batch(vocab: int = 97, batch: int = 2, src: int = 10, tgt: int = 7):
    g = torch.Generator().manual_seed(0)
    return torch.randint(2, vocab, (batch, src), generator=g), torch.randint(2, vocab, (batch, tgt), generator=g)


def _forward(model, ids, labels, **kwargs):
    if isinstance(model, SwitchTransformer):
        return model(ids, labels=labels, **kwargs)
    return model(ids, labels=ids, **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_models_run_forward_and_backward(make_config, arch, sparse, dtype):
    torch.manual_seed(0)
    model = build_model(make_config(arch, sparse=sparse))
    ids, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = _forward(model, ids, labels)
    assert out.logits.dtype == dtype
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert (len(out.router) > 0) == sparse


def test_switch_layers_replace_every_other_ffn_or_all(make_config):
    model = build_model(make_config(num_layers=4, num_decoder_layers=4))
    kinds = [type(b.ffn) for b in model.encoder.blocks]
    assert kinds == [DenseFFN, SwitchFFN, DenseFFN, SwitchFFN]
    every = build_model(make_config(num_layers=3, sparse_every=1))
    assert all(isinstance(b.ffn, SwitchFFN) for b in every.encoder.blocks)
    dense = build_model(make_config(sparse=False))
    assert not any(isinstance(m, SwitchFFN) for m in dense.modules())


def test_total_loss_is_cross_entropy_plus_weighted_mean_aux_losses(make_config):
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, load_balancing_loss_coef=0.05, z_loss_coef=0.002, router_jitter=0.0)
    model = build_model(make_config(moe=moe, num_layers=4, num_decoder_layers=4))
    ids, labels = _batch()
    out = model(ids, labels=labels)
    assert [r.name for r in out.router] == ["encoder.1", "encoder.3", "decoder.1", "decoder.3"]
    lb = torch.stack([r.load_balancing_loss for r in out.router]).mean()
    z = torch.stack([r.z_loss for r in out.router]).mean()
    ce, count = token_cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.ce_loss, ce)
    torch.testing.assert_close(out.loss, ce + 0.05 * lb + 0.002 * z)
    assert int(count) == labels.numel() == int(out.num_label_tokens)


def test_cross_entropy_ignores_minus_100_labels(make_config):
    model = build_model(make_config())
    ids, labels = _batch()
    masked = labels.clone()
    masked[:, 4:] = -100
    out = model(ids, labels=masked)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :4].reshape(-1, 97), labels[:, :4].reshape(-1))
    torch.testing.assert_close(out.ce_loss, manual)
    assert int(out.num_label_tokens) == 8


def test_tied_logits_are_scaled_by_inverse_sqrt_d_model_and_untied_use_a_head(make_config):
    model = build_model(make_config())
    ids, labels = _batch()
    out = model(ids, labels=labels)
    expected = (out.hidden_states * 32**-0.5) @ model.shared.weight.t()
    torch.testing.assert_close(out.logits, expected)
    untied = build_model(make_config(tie_word_embeddings=False))
    assert untied.lm_head is not None
    out = untied(ids, labels=labels)
    torch.testing.assert_close(out.logits, out.hidden_states @ untied.lm_head.weight.t())


def test_decoder_is_causal_and_encoder_is_bidirectional(make_config):
    torch.manual_seed(0)
    model = build_model(make_config()).eval()
    ids, labels = _batch()
    base = model(ids, labels=labels)
    changed_labels = labels.clone()
    changed_labels[:, -1] = (labels[:, -1] + 1) % 97  # only affects decoder inputs after the last position
    torch.testing.assert_close(model(ids, labels=changed_labels).logits, base.logits)
    changed_ids = ids.clone()
    changed_ids[:, -1] = (ids[:, -1] + 1) % 97
    enc = model.encode(ids).hidden_states
    enc_changed = model.encode(changed_ids).hidden_states
    assert not torch.allclose(enc[:, 0], enc_changed[:, 0])  # the first position sees the last one


def test_encoder_padding_does_not_change_real_positions(make_config):
    torch.manual_seed(0)
    model = build_model(make_config()).eval()
    ids, labels = _batch(src=6)
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 4)], 1).long()
    short = model(ids, labels=labels)
    long = model(padded, attention_mask=mask, labels=labels)
    torch.testing.assert_close(long.logits, short.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(long.load_balancing_loss, short.load_balancing_loss)


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_with_kv_cache_matches_the_full_forward(make_config, arch):
    torch.manual_seed(0)
    model = build_model(make_config(arch)).eval()
    ids, labels = _batch()
    if isinstance(model, SwitchTransformer):
        decoder_ids = model.shift_right(labels)
        full = model(ids, decoder_input_ids=decoder_ids).logits
        encoder_output = model.encode(ids)
        cache, steps = None, []
        for t in range(decoder_ids.shape[1]):
            out = model(decoder_input_ids=decoder_ids[:, t : t + 1], encoder_output=encoder_output, cache=cache,
                        use_cache=True)  # fmt: skip
            cache = out.cache
            steps.append(out.logits)
    else:
        assert isinstance(model, SwitchLM)
        full = model(ids).logits
        prefix = model(ids[:, :4], use_cache=True)
        cache, steps = prefix.cache, [prefix.logits]
        for t in range(4, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    assert cache is not None and cache.length == full.shape[1]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_reorder_selects_batch_rows(make_config):
    model = build_model(make_config("decoder-only")).eval()
    ids, _ = _batch()
    cache = model(ids, use_cache=True).cache
    flipped = cache.reorder(torch.tensor([1, 0]))
    assert torch.equal(flipped.self_attention[0].key[0], cache.self_attention[0].key[1])


def test_wrong_architecture_is_rejected(make_config):
    with pytest.raises(ValueError, match="decoder-only"):
        SwitchLM(make_config("encoder-decoder"))
    with pytest.raises(ValueError, match="encoder-decoder"):
        SwitchTransformer(make_config("decoder-only"))


def test_paper_init_scale_shrinks_weights(make_config):
    small = build_model(make_config(init_scale=0.1))
    large = build_model(make_config(init_scale=1.0))
    ratio = float(
        large.encoder.blocks[0].ffn.wi.weight.detach().std() / small.encoder.blocks[0].ffn.wi.weight.detach().std()
    )
    assert 2.8 < ratio < 3.5  # std scales with sqrt(scale): sqrt(10) = 3.16


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_a_forward_without_cache_attends_through_the_weights_with_the_same_loss_and_gradients(
    make_config, monkeypatch, checkpoint_every
):
    """Three targets over twenty inputs: the decoder's cross-attention skips the encoder output's keys and
    values (``layers.attention.absorbed_attention_pays``); logits, loss and every gradient stay those of the
    projected path (with activation checkpointing too), and a forward that builds a cache still projects them."""
    from switchformer.layers import attention
    from switchformer.models.stack import set_activation_checkpointing

    torch.manual_seed(0)
    model = build_model(make_config("encoder-decoder")).double()
    set_activation_checkpointing(model, checkpoint_every)
    ids, labels = _batch(src=20, tgt=3)
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0  # the first input is padded: its last memory positions are masked out
    calls = []
    absorbed = attention.Attention._absorbed_attention
    monkeypatch.setattr(attention.Attention, "_absorbed_attention", lambda *a: calls.append(1) or absorbed(*a))

    def run() -> tuple[torch.Tensor, ...]:
        out = model(ids, attention_mask=mask, labels=labels)
        return (out.logits, out.loss, *torch.autograd.grad(out.loss, list(model.parameters())))

    through_weights = run()
    per_run = 3 * (2 if checkpoint_every else 1)  # once in each decoder block, again where the backward recomputes
    assert len(calls) == per_run
    cached = model(ids, attention_mask=mask, decoder_input_ids=labels, use_cache=True).cache
    assert len(calls) == per_run and all(kv is not None for kv in cached.cross_attention)
    monkeypatch.setattr(attention, "absorbed_attention_pays", lambda *args: False)
    for got, want in zip(through_weights, run(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

"""Activation checkpointing: the same loss, gradients and random stream, with fewer tensors kept for backward."""

from __future__ import annotations

import pytest
import torch

from switchformer import MoEConfig, build_model
from switchformer.models.stack import TransformerStack, set_activation_checkpointing


def _noisy_config(make_config, architecture):
    """Dropout, jitter and capacity-limited top-1 routing: everything a recompute could get wrong."""
    moe = MoEConfig(num_experts=4, capacity_factor=1.0, router_jitter=0.05)
    return make_config(architecture, dropout=0.2, moe=moe)


def _batch(architecture, vocab=97):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding takes part in neither attention nor routing
    labels = ids.clone() if architecture == "decoder-only" else torch.randint(2, vocab, (3, 6), generator=g)
    return ids, mask, labels


def _step(model, architecture, *, seed=3):
    """One training forward and backward from a fixed RNG state: loss, aux loss, gradients, next random draw."""
    ids, mask, labels = _batch(architecture)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(ids, attention_mask=mask, labels=labels)
    (out.loss).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.aux_loss.detach(), grads, torch.rand(4)


@pytest.mark.parametrize("architecture", ["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("every", [1, 2])
def test_recomputed_blocks_give_the_same_loss_gradients_and_random_stream(make_config, architecture, every):
    torch.manual_seed(0)
    model = build_model(_noisy_config(make_config, architecture)).train()
    loss, aux, grads, after = _step(model, architecture)
    model.set_activation_checkpointing(every)
    loss_ckpt, aux_ckpt, grads_ckpt, after_ckpt = _step(model, architecture)

    assert loss.item() > 0 and aux.item() > 0
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)  # the forward itself is unchanged
    torch.testing.assert_close(aux_ckpt, aux, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys() and any(".router." in name for name in grads)
    for name, grad in grads.items():
        # the recomputed forward drew the same dropout and jitter noise, so the gradients agree to rounding
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(after_ckpt, after)  # the recompute restored the RNG: the next draw is the same


@pytest.mark.parametrize(
    "routing",
    [
        {"dropless": True},  # expert batch sized by the busiest expert: recomputed shapes must match
        {"overflow": "next-best", "capacity_factor": 0.5},  # re-routing rounds decided on the host
        {"top_k": 2, "capacity_factor": 2.0},
    ],
    ids=["dropless", "next-best", "top-2"],
)
def test_data_dependent_routing_recomputes_the_same_way(make_config, routing):
    moe = MoEConfig(num_experts=4, router_jitter=0.05, **routing)
    torch.manual_seed(0)
    model = build_model(make_config("decoder-only", dropout=0.1, moe=moe)).train()
    loss, aux, grads, _ = _step(model, "decoder-only")
    model.set_activation_checkpointing(1)
    loss_ckpt, aux_ckpt, grads_ckpt, _ = _step(model, "decoder-only")
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    torch.testing.assert_close(aux_ckpt, aux, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _bytes_saved_for_backward(model, architecture):
    """Bytes of every tensor autograd keeps between forward and backward (parameters included)."""
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    ids, mask, labels = _batch(architecture)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return saved


@pytest.mark.parametrize("architecture", ["encoder-decoder", "decoder-only"])
def test_checkpointing_keeps_fewer_tensors_for_the_backward_pass(make_config, architecture):
    config = _noisy_config(make_config, architecture).replace(num_layers=4, num_decoder_layers=4)
    torch.manual_seed(0)
    model = build_model(config).train()
    plain = _bytes_saved_for_backward(model, architecture)
    model.set_activation_checkpointing(2)
    half = _bytes_saved_for_backward(model, architecture)
    model.set_activation_checkpointing(1)
    every = _bytes_saved_for_backward(model, architecture)
    assert every < half < plain
    assert every < 0.25 * plain  # the embedding, final norm and output layer keep theirs; blocks keep one input each


def test_evaluation_and_cached_decoding_do_not_recompute(make_config):
    torch.manual_seed(0)
    model = build_model(make_config("decoder-only")).eval()
    ids = torch.randint(2, 97, (2, 5))
    expected = model.generate(input_ids=ids, max_new_tokens=4).sequences
    model.set_activation_checkpointing(1)
    with torch.no_grad():  # no graph: nothing to recompute, and no checkpoint warning
        model(ids, labels=ids)
    torch.testing.assert_close(model.generate(input_ids=ids, max_new_tokens=4).sequences, expected)


def test_switching_it_off_and_bad_values(make_config):
    model = build_model(make_config("encoder-decoder"))
    assert set_activation_checkpointing(model, 1) == 2  # encoder and decoder
    assert {m.checkpoint_every for m in model.modules() if isinstance(m, TransformerStack)} == {1}
    set_activation_checkpointing(model, 0)
    assert {m.checkpoint_every for m in model.modules() if isinstance(m, TransformerStack)} == {0}
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match="must be >= 0"):
            set_activation_checkpointing(model, bad)
    with pytest.raises(ValueError, match="no TransformerStack"):
        set_activation_checkpointing(torch.nn.Linear(2, 2), 1)

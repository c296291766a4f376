"""The chunked output-layer loss against ``F.cross_entropy(F.linear(...))``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from switchformer.layers.linear_cross_entropy import chunk_rows, linear_cross_entropy


def _inputs(dtype=torch.float64, rows=37, dim=16, vocab=50):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(vocab, dim, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[[0, 9, rows - 1]] = -100  # ignored rows, one of them the last of a short final chunk
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    logits = F.linear(hidden, weight)  # float32 at least, as the model's token_cross_entropy
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="sum")


@pytest.mark.parametrize("chunk_size", [1, 8, 36, 37, 1000])
def test_loss_and_gradients_match_the_unfused_output_layer(chunk_size):
    hidden, weight, labels = _inputs()
    expected = _reference(hidden, weight, labels)
    want = torch.autograd.grad(expected * 2.5, (hidden, weight))  # an upstream gradient other than 1
    got = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)
    have = torch.autograd.grad(got * 2.5, (hidden, weight))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(have, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert have[0][[0, 9, 36]].abs().max() == 0, "ignored rows get no gradient"


def test_the_loss_by_hand_on_two_rows():
    # logits row 0: [0, ln 3] -> label 1: -log(3/4); row 1: [0, 0] -> label 0: log 2.
    hidden = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    weight = torch.tensor([[0.0], [torch.log(torch.tensor(3.0)).item()]], dtype=torch.float64)
    got = linear_cross_entropy(hidden, weight, torch.tensor([1, 0]), chunk_size=1)
    torch.testing.assert_close(
        got,
        torch.tensor(-torch.log(torch.tensor(0.75)).item() + torch.log(torch.tensor(2.0)).item(), dtype=torch.float64),
    )


def test_a_frozen_weight_gets_no_gradient_and_no_grad_mode_computes_the_loss_only():
    hidden, weight, labels = _inputs(torch.float32)
    weight.requires_grad_(False)
    got = linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    got.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        again = linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    assert not again.requires_grad
    torch.testing.assert_close(again, _reference(hidden, weight, labels), rtol=1e-6, atol=1e-5)


def test_under_bf16_autocast_the_matmuls_are_bf16_and_the_loss_is_float32():
    hidden, weight, labels = _inputs(torch.float32, rows=64, dim=32, vocab=97)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _reference(hidden, weight, labels)
        got = linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    assert got.dtype == torch.float32
    want = torch.autograd.grad(expected, (hidden, weight))
    have = torch.autograd.grad(got, (hidden, weight))
    assert have[0].dtype == torch.float32 and have[1].dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=0.0)
    for a, b in zip(have, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def test_blocks_hold_about_32m_logits_and_bad_shapes_are_refused():
    assert chunk_rows(4096) == 8192
    assert chunk_rows(32128) == 1044
    assert chunk_rows(10**8) == 1
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match=r"labels must be \[N\] = \[37\]"):
        linear_cross_entropy(hidden, weight, labels[:5])
    with pytest.raises(ValueError, match="need hidden"):
        linear_cross_entropy(hidden, weight[:, :3], labels)

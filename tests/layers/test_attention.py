"""The explicit attention path (CPU training) against SDPA, and the rule that picks it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from switchformer.layers import attention as attention_module
from switchformer.layers.attention import Attention, explicit_attention, explicit_attention_pays

B, H, S, K = 2, 3, 5, 4
MASKED = torch.finfo(torch.float32).min  # what the model stacks write into blocked positions


def _inputs(dtype: torch.dtype = torch.float64, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, K, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, H, S, S, generator=gen, dtype=dtype)
    blocked = torch.ones(S, S, dtype=torch.bool).triu(1)
    blocked[2] = True  # one query row sees no key at all
    bias = bias.masked_fill(blocked, MASKED).requires_grad_()
    return q, k, v, bias


def _reference(q, k, v, bias):
    """Attention by its definition, one query row at a time, in float64."""
    out = torch.empty(B, H, S, K, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(S):
                scores = torch.stack([q[b, h, i] @ k[b, h, j] + bias[0, h, i, j] for j in range(S)])
                out[b, h, i] = torch.softmax(scores, 0) @ v[b, h]
    return out


def test_explicit_attention_matches_the_definition_and_sdpa_in_value_and_gradient():
    q, k, v, bias = _inputs()
    out = explicit_attention(q, k, v, bias)
    with torch.no_grad():
        torch.testing.assert_close(out, _reference(q, k, v, bias), rtol=1e-12, atol=1e-12)
    # A fully blocked row attends uniformly (finite masks): the mean of the values.
    torch.testing.assert_close(out[:, :, 2], v.mean(2), rtol=1e-12, atol=1e-12)

    upstream = torch.randn(B, H, S, K, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v, bias), upstream)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    torch.testing.assert_close(out, sdpa, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(sdpa, (q, k, v, bias), upstream), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_explicit_attention_keeps_bf16_matmuls_but_a_float32_softmax():
    q, k, v, bias = (t.detach().float() for t in _inputs())
    out = explicit_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), explicit_attention(q, k, v, bias), rtol=0.05, atol=0.05)


def test_explicit_attention_dropout_drops_attention_weights():
    q, k, v, bias = _inputs()
    assert torch.count_nonzero(explicit_attention(q, k, v, bias, dropout=1.0)) == 0
    torch.manual_seed(0)
    dropped = explicit_attention(q, k, v, bias, dropout=0.5)
    assert torch.isfinite(dropped).all()
    assert not torch.allclose(dropped, explicit_attention(q, k, v, bias))


@pytest.mark.parametrize(
    ("dtype", "q_grad", "bias_grad", "grad_mode", "expected"),
    [
        (torch.float32, True, True, True, True),  # SDPA would fall back to its math kernel for the bias gradient
        (torch.float32, False, True, True, True),
        (torch.float32, True, False, True, False),  # SDPA's fused kernel wins
        (torch.bfloat16, True, False, True, True),  # SDPA's bf16 flash backward is slow on CPU
        (torch.bfloat16, False, False, True, False),  # nothing to differentiate
        (torch.float32, True, True, False, False),  # inference
        (torch.bfloat16, True, True, False, False),
    ],
)
def test_the_explicit_path_is_taken_only_where_it_was_measured_faster(dtype, q_grad, bias_grad, grad_mode, expected):
    q = torch.zeros(1, 1, 2, 2, dtype=dtype, requires_grad=q_grad)
    bias = torch.zeros(1, 1, 2, 2, requires_grad=bias_grad)
    with torch.set_grad_enabled(grad_mode):
        assert explicit_attention_pays(q, q, bias) is expected


def test_the_attention_layer_trains_alike_on_either_path(monkeypatch):
    torch.manual_seed(0)
    layer = Attention(d_model=8, num_heads=2, d_kv=4).double()
    layer.reset_parameters(init_scale=1.0)
    x = torch.randn(B, S, 8, dtype=torch.float64)
    position_bias = torch.randn(1, 2, S, S, dtype=torch.float64, requires_grad=True)

    def run() -> tuple[torch.Tensor, ...]:
        causal = torch.ones(S, S, dtype=torch.bool).triu(1)
        out, _ = layer(x, position_bias.masked_fill(causal, MASKED))
        loss = (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum()
        return (out, *torch.autograd.grad(loss, (position_bias, *layer.parameters())))

    calls = []
    monkeypatch.setattr(
        attention_module, "explicit_attention", lambda *a, **kw: calls.append(1) or explicit_attention(*a, **kw)
    )
    explicit = run()
    assert calls, "training on CPU with a learned bias should take the explicit path"
    monkeypatch.setattr(attention_module, "explicit_attention_pays", lambda *args: False)
    for got, want in zip(explicit, run(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

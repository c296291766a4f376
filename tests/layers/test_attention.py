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


@pytest.mark.parametrize(
    ("queries", "keys", "expected"),
    [
        # projecting: L D K + S L K; through the weights: S K D + S L D (d_kv 64, d_model 768); pays below 90%
        (16, 512, True),  # 25.17M + 0.52M against 0.79M + 6.29M
        (54, 512, True),  # 0.9 x (25.17M + 1.77M) = 24.24M against 2.65M + 21.23M = 23.89M
        (55, 512, False),  # 0.9 x (25.17M + 1.80M) = 24.27M against 2.70M + 21.63M = 24.33M
        (61, 512, False),  # fewer multiply-adds (26.98M against 27.16M), but within the margin
        (49, 256, True),  # 0.9 x (12.58M + 0.80M) = 12.047M against 2.408M + 9.634M = 12.042M
        (50, 256, False),  # 0.9 x (12.58M + 0.82M) = 12.06M against 2.46M + 9.83M = 12.29M
        (114, 512, False),  # span-corruption targets over 512 inputs
        (1, 1, False),  # 49152 + 64 against 49152 + 768
    ],
)
def test_absorbed_attention_pays_where_it_does_fewer_multiply_adds(queries, keys, expected):
    assert attention_module.absorbed_attention_pays(queries, keys, 64, 768) is expected


def _cross_attention_case(
    *, dropout: float = 0.0, per_head_bias: bool = False
) -> tuple[Attention, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two queries over nine memory positions, d_kv 4 and d_model 16: through the weights pays. The bias masks the
    first row's last two memory positions (padding); ``per_head_bias`` adds values that differ by head and query."""
    torch.manual_seed(0)
    layer = Attention(d_model=16, num_heads=2, d_kv=4, dropout=dropout).double()
    layer.reset_parameters(init_scale=1.0)
    x = torch.randn(B, 2, 16, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(B, 9, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(B, 1, 1, 9, dtype=torch.float64).masked_fill(torch.arange(9) >= 7, MASKED)  # padded memory
    bias[1] = 0.0
    if per_head_bias:
        bias = bias + torch.randn(1, 2, 2, 9, dtype=torch.float64)
    assert attention_module.absorbed_attention_pays(2, 9, 4, 16)
    return layer, x, memory, bias


@pytest.mark.parametrize("per_head_bias", [False, True])
def test_cross_attention_through_the_weights_equals_projecting_the_memory_in_value_and_gradient(per_head_bias):
    layer, x, memory, bias = _cross_attention_case(per_head_bias=per_head_bias)

    def run(keep_kv: bool) -> tuple[torch.Tensor, ...]:
        out, kv = layer(x, bias, memory_BMD=memory, static_memory=True, keep_kv=keep_kv)
        assert (kv is None) is (not keep_kv)
        loss = (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum()
        return (out, *torch.autograd.grad(loss, (x, memory, *layer.parameters())))

    absorbed, projected = run(keep_kv=False), run(keep_kv=True)
    for got, want in zip(absorbed, projected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the padded memory positions get no gradient on either path
    assert absorbed[2][0, 7:].abs().max() == 0


def test_cross_attention_through_the_weights_drops_attention_weights_in_training():
    """Dropout falls on the attention weights: the projected path here (float64 on CPU, recording gradients)
    drops ``[B, H, S, L]`` weights with ``F.dropout`` in the same order, so the same seed drops the same ones."""
    layer, x, memory, bias = _cross_attention_case(dropout=0.5)
    layer.train()
    outputs = {}
    for keep_kv in (False, True):
        torch.manual_seed(1)
        outputs[keep_kv], _ = layer(x, bias, memory_BMD=memory, static_memory=True, keep_kv=keep_kv)
    layer.eval()
    plain, _ = layer(x, bias, memory_BMD=memory, static_memory=True, keep_kv=False)
    torch.testing.assert_close(outputs[False], outputs[True], rtol=1e-10, atol=1e-12)
    assert (outputs[False] - plain).abs().max() > 1e-3


def test_self_attention_and_projections_other_than_plain_linear_keep_the_projected_path(monkeypatch):
    """Self-attention, a reparametrised projection, and one with a forward hook (diagnostics hook every module)
    all run the projections."""
    layer, x, memory, bias = _cross_attention_case()
    taken = []
    monkeypatch.setattr(Attention, "_absorbed_attention", lambda self, q, *a: taken.append(1) or torch.zeros_like(q))
    layer(x, torch.zeros(1, 1, 2, 2, dtype=torch.float64), keep_kv=False)  # self-attention
    hook = layer.v.register_forward_hook(lambda module, args, out: None)
    _, kv = layer(x, bias, memory_BMD=memory, static_memory=True, keep_kv=False)
    assert not taken and kv is not None
    hook.remove()
    layer.k = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 8, bias=False).double())
    _, kv = layer(x, bias, memory_BMD=memory, static_memory=True, keep_kv=False)
    assert not taken and kv is not None
    layer.k = torch.nn.Linear(16, 8, bias=False).double()
    layer(x, bias, memory_BMD=memory, static_memory=True, keep_kv=False)
    assert taken  # the same call with plain projections attends through the weights

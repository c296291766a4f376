"""T5 multi-head attention: no biases, no ``1/sqrt(d_kv)`` scaling (folded into the query init), additive bias.

Shape legend: B batch, S query length, L key length, H heads, K d_kv, D d_model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from switchformer.layers.initialization import InitKind, InitRule, apply_init_rules
from switchformer.layers.kv_cache import LayerKV


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_kv: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.d_kv = num_heads, d_kv
        inner = num_heads * d_kv
        self.q = nn.Linear(d_model, inner, bias=False)
        self.k = nn.Linear(d_model, inner, bias=False)
        self.v = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)
        self.dropout = dropout

    def init_rules(self, *, init_scale: float) -> dict[str, InitRule]:
        d_model = self.q.in_features
        rule = InitKind.SCALED_TRUNC_NORMAL
        return {
            # Mesh-TF folds the 1/sqrt(d_kv) score scaling into the query initialisation.
            "q.weight": InitRule(rule, init_scale, fan_in=d_model * self.d_kv),
            "k.weight": InitRule(rule, init_scale, fan_in=d_model),
            "v.weight": InitRule(rule, init_scale, fan_in=d_model),
            "o.weight": InitRule(rule, init_scale, fan_in=self.o.in_features),
        }

    def reset_parameters(self, *, init_scale: float) -> None:
        apply_init_rules(self, self.init_rules(init_scale=init_scale))

    def _heads(self, x_BSD: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        return proj(x_BSD).view(x_BSD.shape[0], x_BSD.shape[1], self.num_heads, self.d_kv).transpose(1, 2)

    def forward(
        self,
        x_BSD: torch.Tensor,
        bias: torch.Tensor,
        *,
        memory_BMD: torch.Tensor | None = None,
        cache: LayerKV | None = None,
        static_memory: bool = False,
        keep_kv: bool = True,
    ) -> tuple[torch.Tensor, LayerKV | None]:
        """Attend from ``x`` to itself (``memory=None``) or to ``memory`` (cross-attention).

        ``bias`` is added to the scores (relative position bias plus masks, broadcastable to ``[B, H, S, L]``).
        With a ``cache``, self-attention appends the new keys/values; cross-attention (``static_memory=True``)
        reuses the cached ones, computed once from the encoder output. With ``keep_kv=False`` (no cache is built),
        cross-attention may skip the memory's keys and values where :func:`absorbed_attention_pays`, and then
        returns ``None`` for them.
        """
        q_BHSK = self._heads(x_BSD, self.q)
        dropout = self.dropout if self.training else 0.0
        if memory_BMD is not None and cache is None and not keep_kv and self._absorbable(q_BHSK, memory_BMD):
            kv = None
            out_BHSK = self._absorbed_attention(q_BHSK, memory_BMD, bias, dropout)
        else:
            if static_memory and cache is not None:
                kv = cache
            else:
                source = x_BSD if memory_BMD is None else memory_BMD
                key, value = self._heads(source, self.k), self._heads(source, self.v)
                kv = LayerKV(key, value) if cache is None else cache.append(key, value)
            key, value = kv.key.to(q_BHSK.dtype), kv.value.to(q_BHSK.dtype)
            if explicit_attention_pays(q_BHSK, key, bias):
                out_BHSK = explicit_attention(q_BHSK, key, value, bias, dropout=dropout)
            else:
                out_BHSK = F.scaled_dot_product_attention(
                    q_BHSK, key, value, attn_mask=bias.to(q_BHSK.dtype), dropout_p=dropout, scale=1.0
                )
        out_BSD = out_BHSK.transpose(1, 2).reshape(x_BSD.shape[0], x_BSD.shape[1], -1)
        return self.o(out_BSD), kv

    def _absorbable(self, q_BHSK: torch.Tensor, memory_BMD: torch.Tensor) -> bool:
        # Only plain projections: not packed, reparametrised or hooked ones (diagnostics hook every module).
        projections = (self.k, self.v)
        plain = all(type(p) is nn.Linear and not (p._forward_pre_hooks or p._forward_hooks) for p in projections)
        return plain and absorbed_attention_pays(q_BHSK.shape[2], memory_BMD.shape[1], self.d_kv, memory_BMD.shape[2])

    def _absorbed_attention(
        self, q_BHSK: torch.Tensor, memory_BMD: torch.Tensor, bias: torch.Tensor, dropout: float
    ) -> torch.Tensor:
        """Cross-attention through the key and value weights instead of the memory's keys and values.

        Per head, ``q (M Wk)^T = (q Wk) M^T`` and ``p (M Wv^T) = (p M) Wv^T`` (``M`` the memory, ``Wk``/``Wv`` the
        head's ``[K, D]`` slices): the queries move to the memory's width once, so the memory is never projected.
        Scores and softmax as :func:`explicit_attention`; the same values up to rounding.
        """
        B, H, S, K = q_BHSK.shape
        L, D = memory_BMD.shape[1], memory_BMD.shape[2]
        memory_BLD = memory_BMD.to(q_BHSK.dtype)
        wk_HKD = self.k.weight.to(q_BHSK.dtype).view(H, K, D)
        wv_HKD = self.v.weight.to(q_BHSK.dtype).view(H, K, D)
        q_HNK = q_BHSK.transpose(0, 1).reshape(H, B * S, K)  # N = B * S: one product per head
        qk_BQD = torch.bmm(q_HNK, wk_HKD).view(H, B, S, D).transpose(0, 1).reshape(B, H * S, D)  # Q = H * S
        bias_BQL = bias.expand(B, H, S, L).reshape(B, H * S, L)
        mixed_BQD = explicit_attention(qk_BQD, memory_BLD, memory_BLD, bias_BQL, dropout=dropout)
        mixed_HND = mixed_BQD.view(B, H, S, D).transpose(0, 1).reshape(H, B * S, D)
        return torch.bmm(mixed_HND, wv_HKD.transpose(1, 2)).view(H, B, S, K).transpose(0, 1)


def absorbed_attention_pays(queries: int, keys: int, d_kv: int, d_model: int) -> bool:
    """Whether cross-attention through the weights (:meth:`Attention._absorbed_attention`) does at least 10% fewer
    multiply-adds than projecting the memory's keys and values and attending to them.

    Per batch row and head: projecting costs ``2 L D K`` and attending ``2 S L K``; through the weights, moving the
    queries to width ``D`` and back costs ``2 S K D`` and attending at that width ``2 S L D``. So it pays for
    queries much fewer than the memory's length: a forward with a short decoder input over a long encoder output
    (at ``K = 64`` and ``D = 768``, up to 54 queries over 512 keys). Decoding keeps the cached keys and values
    instead. The 10% margin covers the copies of the width-``D`` intermediates: timed layer by layer, the crossover
    falls at 0.9 to 0.95 of the multiply-add break-even (``bench/bench_cross_attention.py --layer-sweep``,
    ``docs/results/generation/``).
    """
    projected = keys * d_model * d_kv + queries * keys * d_kv
    absorbed = queries * d_kv * d_model + queries * keys * d_model
    return 10 * absorbed < 9 * projected


def explicit_attention_pays(q_BHSK: torch.Tensor, k_BHLK: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether :func:`explicit_attention` beats ``scaled_dot_product_attention`` for this call.

    Only on CPU, and only when autograd records the call. A bias that needs a gradient (T5's learned position
    bias) sends SDPA to its generic math kernel, and in bf16 its flash kernel's backward is slow: forward and
    backward of one layer of the comparison's models (32 x 4 heads x 128 x 128, 2 threads) ran 1.14x faster in
    float32 and 1.8x in bf16 (``bench/bench_attention.py``), and the whole training step 1.01-1.04x and 1.10x.
    A float32 call whose bias is frozen (cross-attention) keeps SDPA's flash kernel: it is up to 1.3x slower
    there but holds a third to a quarter of the memory. Inference keeps SDPA.
    """
    if q_BHSK.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if bias.requires_grad:
        return True
    return q_BHSK.dtype != torch.float32 and (q_BHSK.requires_grad or k_BHLK.requires_grad)


def explicit_attention(
    q_BHSK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, bias: torch.Tensor, *, dropout: float = 0.0
) -> torch.Tensor:
    """``softmax(q k^T + bias) v`` from plain ops, the scores and softmax in (at least) float32, the matmuls in q's
    dtype.

    Unscaled like SDPA with ``scale=1.0``. The masks are large finite negatives (never ``-inf``), so no row of the
    softmax is undefined and SDPA's fully-masked-row guard is not needed.
    """
    scores_BHSL = torch.matmul(q_BHSK, k_BHLK.transpose(-1, -2))
    softmax_dtype = torch.promote_types(scores_BHSL.dtype, torch.float32)  # float64 stays float64
    scores_BHSL = scores_BHSL.to(softmax_dtype) + bias.to(softmax_dtype)
    probs_BHSL = torch.softmax(scores_BHSL, dim=-1)
    if dropout:
        probs_BHSL = F.dropout(probs_BHSL, dropout)
    return torch.matmul(probs_BHSL.to(v_BHLK.dtype), v_BHLK)

"""One pre-norm T5 block: self-attention, optional cross-attention, and a dense or Switch FFN."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from switchformer.layers.attention import Attention
from switchformer.layers.feed_forward import DenseFFN
from switchformer.layers.kv_cache import LayerKV
from switchformer.layers.norm import RMSNorm
from switchformer.models.config import ModelConfig
from switchformer.moe.layer import MoEOutput, SwitchFFN, SwitchFFNConfig


@dataclasses.dataclass
class BlockOutput:
    hidden_states: torch.Tensor  # [B, S, D]
    moe: MoEOutput | None  # None for a dense FFN
    self_kv: LayerKV
    cross_kv: LayerKV | None


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, *, sparse: bool, cross_attention: bool) -> None:
        super().__init__()
        d, eps = config.d_model, config.layer_norm_eps
        self.self_attn_norm = RMSNorm(d, eps)
        self.self_attn = Attention(d, config.num_heads, config.head_dim, dropout=config.dropout)
        self.cross_attn_norm = RMSNorm(d, eps) if cross_attention else None
        self.cross_attn = (
            Attention(d, config.num_heads, config.head_dim, dropout=config.dropout) if cross_attention else None
        )
        self.ffn_norm = RMSNorm(d, eps)
        if sparse:
            layer = SwitchFFNConfig(
                d_model=d,
                d_ff=config.d_ff,
                activation=config.activation,
                init_scale=config.init_scale,
                moe=config.resolved_moe(),
            )
            self.ffn: DenseFFN | SwitchFFN = SwitchFFN(layer)
        else:
            self.ffn = DenseFFN(d, config.d_ff, config.activation, dropout=config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def is_sparse(self) -> bool:
        return isinstance(self.ffn, SwitchFFN)

    def forward(
        self,
        x_BSD: torch.Tensor,
        *,
        self_bias: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        memory_BMD: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
        self_kv: LayerKV | None = None,
        cross_kv: LayerKV | None = None,
        keep_cross_kv: bool = True,
    ) -> BlockOutput:
        attn, new_self_kv = self.self_attn(self.self_attn_norm(x_BSD), self_bias, cache=self_kv)
        x_BSD = x_BSD + self.dropout(attn)
        new_cross_kv = None
        if self.cross_attn is not None and self.cross_attn_norm is not None and cross_bias is not None:
            attn, new_cross_kv = self.cross_attn(
                self.cross_attn_norm(x_BSD),
                cross_bias,
                memory_BMD=memory_BMD,
                cache=cross_kv,
                static_memory=True,
                keep_kv=keep_cross_kv,
            )
            x_BSD = x_BSD + self.dropout(attn)
        normed = self.ffn_norm(x_BSD)
        moe_out = None
        if isinstance(self.ffn, SwitchFFN):
            moe_out = self.ffn(normed, token_mask=token_mask)
            ffn_out = moe_out.hidden_states
        else:
            ffn_out = self.ffn(normed)
        x_BSD = x_BSD + self.dropout(ffn_out)
        return BlockOutput(x_BSD, moe_out, new_self_kv, new_cross_kv)

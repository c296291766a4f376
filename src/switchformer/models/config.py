"""Configuration of the T5-style models: the encoder-decoder and the decoder-only language model."""

from __future__ import annotations

import dataclasses
import enum

from switchformer.config import Config
from switchformer.layers.activation import Activation
from switchformer.moe.config import MoEConfig


class Architecture(enum.Enum):
    ENCODER_DECODER = "encoder-decoder"  # T5 / the paper's Switch-Base ... Switch-C
    DECODER_ONLY = "decoder-only"  # a causal language model built from the same blocks


@dataclasses.dataclass
class ModelConfig(Config):
    """A T5 / Switch Transformer. ``moe=None`` gives the FLOP-matched dense baseline from the same code."""

    architecture: Architecture = Architecture.ENCODER_DECODER
    vocab_size: int = 32128  # T5's SentencePiece vocabulary padded to a multiple of 128
    d_model: int = 768
    d_ff: int = 3072  # one expert's hidden width; experts keep the dense model's FLOPs per token
    num_heads: int = 12
    d_kv: int | None = None  # per-head width; None = d_model // num_heads (T5 allows num_heads * d_kv != d_model)
    num_layers: int = 12  # encoder layers; all layers for a decoder-only model
    num_decoder_layers: int | None = None  # None = num_layers
    activation: Activation = Activation.RELU
    dropout: float = 0.1
    layer_norm_eps: float = 1e-6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    tie_word_embeddings: bool = True  # tied logits are scaled by d_model ** -0.5 (Mesh-TF)
    init_scale: float = 1.0  # the paper uses 0.1 for Switch models
    sparse_every: int = 2  # a Switch layer replaces every N-th FFN: layers 1, 1+N, ... (1 = every layer)
    moe: MoEConfig | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def validate(self) -> None:
        self.check(self.vocab_size >= 2, "vocab_size", "must be >= 2")
        self.check(self.d_model >= 1, "d_model", "must be >= 1")
        self.check(self.d_ff >= 1, "d_ff", "must be >= 1")
        self.check(self.num_heads >= 1, "num_heads", "must be >= 1")
        if self.d_kv is None:
            self.check(
                self.d_model % self.num_heads == 0,
                "num_heads",
                f"d_model={self.d_model} must be divisible by num_heads, or set d_kv explicitly",
            )
        else:
            self.check(self.d_kv >= 1, "d_kv", "must be None or >= 1")
        self.check(self.num_layers >= 1, "num_layers", "must be >= 1")
        self.check(
            self.num_decoder_layers is None or self.num_decoder_layers >= 1, "num_decoder_layers", "must be >= 1"
        )
        self.check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        self.check(self.layer_norm_eps > 0, "layer_norm_eps", "must be > 0")
        self.check(self.relative_attention_num_buckets >= 2, "relative_attention_num_buckets", "must be >= 2")
        self.check(self.relative_attention_max_distance >= 2, "relative_attention_max_distance", "must be >= 2")
        self.check(self.init_scale > 0, "init_scale", "must be > 0 (the paper uses 0.1 for Switch models)")
        self.check(self.sparse_every >= 1, "sparse_every", "must be >= 1 (1 = every FFN is a Switch layer)")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            self.check(
                0 <= getattr(self, name) < self.vocab_size, name, f"must be in [0, vocab_size={self.vocab_size})"
            )

    # -- derived ------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_kv if self.d_kv is not None else self.d_model // self.num_heads

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers

    @property
    def is_sparse(self) -> bool:
        return self.moe is not None

    @property
    def is_encoder_decoder(self) -> bool:
        return self.architecture is Architecture.ENCODER_DECODER

    def is_sparse_layer(self, index: int) -> bool:
        """Layer ``index`` of a stack holds a Switch FFN (the Hugging Face port's placement, for interop)."""
        if self.moe is None:
            return False
        return self.sparse_every == 1 or index % self.sparse_every == 1

    def resolved_moe(self) -> MoEConfig:
        """The MoE config with ``expert_dropout=None`` resolved to the model's dropout rate."""
        assert self.moe is not None
        if self.moe.expert_dropout is not None:
            return self.moe
        return self.moe.replace(expert_dropout=self.dropout)

    def dense(self) -> ModelConfig:
        """The FLOP-matched dense baseline: same shape, every FFN dense."""
        return self.replace(moe=None)

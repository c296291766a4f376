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


class Stack(enum.Enum):
    """A stack of blocks. A decoder-only model has one, its DECODER, sized by ``num_layers``."""

    ENCODER = "encoder"
    DECODER = "decoder"


class InputEmbeddings(enum.Enum):
    """Which token embedding tables the stacks of an encoder-decoder read their inputs from."""

    SHARED = "shared"  # one table for encoder and decoder (T5, Mesh-TF, transformers 4)
    PER_STACK = "per-stack"  # encoder and decoder each have their own (transformers 5 builds untied models so)


def every_nth_layer(num_layers: int, every: int) -> tuple[int, ...]:
    """``sparse_every``'s placement: layers 1, 1 + every, ... of ``num_layers`` (all of them for ``every=1``).

    The Hugging Face port's rule (its ``sparse_step``), which places the released checkpoints' Switch layers.
    """
    return tuple(i for i in range(num_layers) if every == 1 or i % every == 1)


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
    input_embeddings: InputEmbeddings = InputEmbeddings.SHARED  # 'per-stack' needs untied word embeddings
    init_scale: float = 1.0  # the paper uses 0.1 for Switch models
    sparse_every: int = 2  # a Switch layer replaces every N-th FFN: layers 1, 1+N, ... (1 = every layer)
    # Explicit placement per stack, overriding sparse_every for that stack: indices of the blocks whose FFN is a
    # Switch layer, () for a dense stack. sparse_layers is the encoder's (a decoder-only model's one stack's).
    sparse_layers: tuple[int, ...] | None = None
    decoder_sparse_layers: tuple[int, ...] | None = None  # an encoder-decoder's decoder
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
        self._check_placement("sparse_layers", self.num_layers)
        if self.is_encoder_decoder:
            self._check_placement("decoder_sparse_layers", self.decoder_layers)
        else:
            self.check(
                self.decoder_sparse_layers is None,
                "decoder_sparse_layers",
                "must be None for a decoder-only model: its one stack's Switch layers are sparse_layers",
            )
        if self.input_embeddings is InputEmbeddings.PER_STACK:
            self.check(
                self.is_encoder_decoder and not self.tie_word_embeddings,
                "input_embeddings",
                "'per-stack' needs an encoder-decoder with tie_word_embeddings=false (a tied output layer shares "
                "the one input embedding)",
            )
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            self.check(
                0 <= getattr(self, name) < self.vocab_size, name, f"must be in [0, vocab_size={self.vocab_size})"
            )

    def _check_placement(self, field: str, num_layers: int) -> None:
        layers = getattr(self, field)
        if layers is not None:
            self.check(
                all(0 <= i < num_layers for i in layers) and list(layers) == sorted(set(layers)),
                field,
                f"must be None (use sparse_every) or strictly increasing layer indices in [0, {num_layers})",
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

    @property
    def stacks(self) -> tuple[Stack, ...]:
        return (Stack.ENCODER, Stack.DECODER) if self.is_encoder_decoder else (Stack.DECODER,)

    def stack_layers(self, stack: Stack) -> int:
        """Blocks in ``stack``: ``num_layers`` for the encoder or a decoder-only model's stack."""
        return self.decoder_layers if stack is Stack.DECODER and self.is_encoder_decoder else self.num_layers

    def switch_layers(self, stack: Stack) -> tuple[int, ...]:
        """Indices of the blocks of ``stack`` whose FFN is a Switch layer (none for a dense model).

        The explicit ``sparse_layers`` / ``decoder_sparse_layers`` when set, else :func:`every_nth_layer`.
        """
        if self.moe is None:
            return ()
        first = stack is Stack.ENCODER or not self.is_encoder_decoder
        explicit = self.sparse_layers if first else self.decoder_sparse_layers
        if explicit is not None:
            return explicit
        return every_nth_layer(self.stack_layers(stack), self.sparse_every)

    @property
    def num_switch_layers(self) -> int:
        return sum(len(self.switch_layers(stack)) for stack in self.stacks)

    def resolved_moe(self) -> MoEConfig:
        """The MoE config with ``expert_dropout=None`` resolved to the model's dropout rate."""
        assert self.moe is not None
        if self.moe.expert_dropout is not None:
            return self.moe
        return self.moe.replace(expert_dropout=self.dropout)

    def dense(self) -> ModelConfig:
        """The FLOP-matched dense baseline: same shape, every FFN dense."""
        return self.replace(moe=None)

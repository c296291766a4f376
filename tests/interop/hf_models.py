"""Tiny random ``transformers`` Switch models (built locally, nothing downloaded) and their switchformer twins."""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from switchformer import build_model  # noqa: E402
from switchformer.interop.checkpoint_io import config_for_hf_weights  # noqa: E402
from switchformer.interop.hf_config import config_from_hf  # noqa: E402
from switchformer.interop.hf_keys import from_hf_state_dict  # noqa: E402

BASE: dict[str, Any] = {
    "vocab_size": 64,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 48,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "num_experts": 4,
    "num_sparse_encoder_layers": 1,
    "num_sparse_decoder_layers": 1,
    "expert_capacity": 64,
    "decoder_start_token_id": 0,
    "dropout_rate": 0.0,
}


def tiny_hf(seed: int = 0, *, weight_scale: float | None = None, own_stack_tables: bool = False, **changes: Any):
    """A random HF model in eval mode; encoder/decoder embeddings equal ``shared`` as in released checkpoints,
    unless ``own_stack_tables`` keeps the three tables transformers 5 draws for an untied model
    (``tie_word_embeddings=False``). ``weight_scale`` re-draws the matrices with std ``weight_scale /
    sqrt(fan_in)``: 3 makes greedy decoding vary from token to token."""
    torch.manual_seed(seed)
    config = transformers.SwitchTransformersConfig(**(BASE | changes))
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            embedding = any(part in name for part in ("shared", "embed_tokens", "relative_attention_bias"))
            if weight_scale and param.dim() == 2 and not embedding:
                param.normal_(0.0, weight_scale * param.shape[1] ** -0.5)
        if not own_stack_tables:
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    return model


def ours_from_hf(hf_model):
    """Our model with the HF model's weights and HF's routing semantics (through the config and key maps)."""
    state = hf_model.state_dict()
    config = config_for_hf_weights(config_from_hf(hf_model.config), state)
    model = build_model(config).eval()
    model.load_state_dict(from_hf_state_dict(state, config))
    return model


def batch(vocab: int = 64, *, size: int = 3, src: int = 10, tgt: int = 7, seed: int = 1):
    """Inputs with one right-padded row, and decoder inputs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (size, src), generator=g)
    mask = torch.ones_like(ids)
    mask[1, src - 3 :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, torch.randint(2, vocab, (size, tgt), generator=g)

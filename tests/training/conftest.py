from __future__ import annotations

import pytest
import torch

from switchformer import ModelConfig, MoEConfig
from switchformer.training.config import TrainConfig


def tiny_model(architecture: str = "decoder-only", **moe_changes) -> ModelConfig:
    moe = MoEConfig(**{"num_experts": 4, "router_jitter": 0.0, "grouping": "sequence", **moe_changes})
    return ModelConfig(
        architecture=architecture, vocab_size=64, d_model=32, d_ff=64, num_heads=4, num_layers=2, dropout=0.0,
        moe=moe, init_scale=0.1,
    )  # fmt: skip


def synthetic_batches(architecture: str = "decoder-only", *, count: int = 4, batch: int = 8, length: int = 16):
    """Learnable toy data: each sequence counts upward from a random start (mod 60), offset by 4 (specials)."""
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(count):
        start = torch.randint(0, 60, (batch, 1), generator=g)
        seq = (start + torch.arange(length)) % 60 + 4
        if architecture == "decoder-only":
            out.append({"input_ids": seq, "attention_mask": torch.ones_like(seq), "labels": seq.clone()})
        else:
            out.append(
                {"input_ids": seq, "attention_mask": torch.ones_like(seq), "labels": (seq[:, :8] + 1 - 4) % 60 + 4}
            )
    return out


def tiny_train_config(**changes) -> TrainConfig:
    base = TrainConfig(steps=20, lr=3e-3, warmup_steps=2, schedule="constant", log_every=1, eval_every=10,
                       checkpoint_every=10, device="cpu", seed=0)  # fmt: skip
    return base.replace(**changes)


@pytest.fixture
def toy():
    return tiny_model, synthetic_batches, tiny_train_config

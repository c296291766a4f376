"""T5X / flaxformer names: a synthetic checkpoint built from a random model by the inverse map loads back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from switchformer import ModelConfig, MoEConfig, build_model
from switchformer.interop.key_map import CheckpointError, Transform, join, split
from switchformer.interop.t5x import from_t5x, t5x_config, to_t5x


def _config(**changes) -> ModelConfig:
    base = ModelConfig(
        vocab_size=64, d_model=32, d_ff=48, num_heads=4, d_kv=16, num_layers=3, num_decoder_layers=2,
        moe=MoEConfig(num_experts=4), init_scale=0.1,
    )  # fmt: skip
    return base.replace(**changes)


@pytest.mark.parametrize(
    "config",
    [
        _config(),
        _config(activation="gated-gelu", tie_word_embeddings=False, sparse_every=1),
        _config(moe=None, init_scale=1.0),
        _config(sparse_layers=(0, 1, 2), decoder_sparse_layers=(1,)),  # no one sparse_every places these
    ],
    ids=["switch-base-like", "switch-xxl-like", "dense-t5", "per-stack-placement"],
)
def test_t5x_round_trip_is_exact_and_the_config_is_inferred(config):
    torch.manual_seed(0)
    model = build_model(config)
    params = to_t5x(model)
    assert "encoder/layers_0/attention/query/kernel" in params
    assert ("decoder/logits_dense/kernel" in params) != config.tie_word_embeddings
    if config.moe is not None:
        wi = "wi_0" if config.activation.is_gated else "wi"
        assert params[f"encoder/layers_1/mlp/expert/{wi}/kernel"].shape == (4, 32, 48)  # stacked [E, D, F]
        assert params["encoder/layers_1/mlp/router/router_weights/w/kernel"].shape == (32, 4)
    assert params["encoder/relpos_bias/rel_embedding"].shape == (4, 32)  # [heads, buckets]
    assert t5x_config(params) == config.replace(dropout=0.1)
    nested = {"target": params, "state": {"step": np.array(10)}}  # as a T5X checkpoint tree, optimizer state included
    back = from_t5x(nested)
    for key, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_half_precision_arrays_and_split_head_kernels_load():
    torch.manual_seed(0)
    model = build_model(_config(moe=None))
    params = to_t5x(model)
    q = params["encoder/layers_0/attention/query/kernel"]
    params["encoder/layers_0/attention/query/kernel"] = q.reshape(32, 4, 16)  # flaxformer split_head_kernel
    o = params["encoder/layers_0/attention/out/kernel"]
    params["encoder/layers_0/attention/out/kernel"] = o.reshape(4, 16, 32)
    params["token_embedder/embedding"] = params["token_embedder/embedding"].astype(np.float16)
    back = from_t5x(params)
    torch.testing.assert_close(back.encoder.blocks[0].self_attn.q.weight, model.encoder.blocks[0].self_attn.q.weight)
    torch.testing.assert_close(back.encoder.blocks[0].self_attn.o.weight, model.encoder.blocks[0].self_attn.o.weight)
    assert back.shared.weight.dtype == torch.float32
    torch.testing.assert_close(back.shared.weight, model.shared.weight.half().float())


def test_t5x_errors_name_the_problem():
    params = to_t5x(build_model(_config()))
    with pytest.raises(CheckpointError, match="missing 'token_embedder/embedding'"):
        t5x_config({k: v for k, v in params.items() if not k.startswith("token_embedder")})
    params["encoder/layers_7/mlp/extra/kernel"] = np.zeros(3)
    with pytest.raises(CheckpointError, match=r"T5X params: .*unexpected.*layers_7"):
        from_t5x(params, config=_config())


@pytest.mark.parametrize(
    ("transform", "parts"),
    [
        (Transform.COPY, [(3, 5)]),
        (Transform.TRANSPOSE, [(3, 5)]),
        (Transform.CONCAT_ROWS, [(4, 6), (4, 6)]),
        (Transform.CONCAT_KERNELS, [(6, 4), (6, 4)]),
        (Transform.STACK_T, [(4, 6)] * 3),
        (Transform.STACK_T_GATED, [(4, 6)] * 6),
        (Transform.CONCAT_LAST, [(3, 6, 4), (3, 6, 4)]),
    ],
)
def test_every_transform_splits_back_into_its_parts(transform, parts):
    tensors = [torch.randn(shape) for shape in parts]
    joined = join(transform, tensors)
    assert all(torch.equal(a, b) for a, b in zip(split(transform, joined, len(tensors)), tensors, strict=True))
    # Gated layouts: our fused wi holds the gate (wi_0, the first part) in its first half.
    if transform is Transform.CONCAT_ROWS:
        assert torch.equal(joined[:4], tensors[0])
    if transform is Transform.CONCAT_KERNELS:
        assert torch.equal(joined[:4], tensors[0].T)
    if transform is Transform.STACK_T_GATED:
        assert joined.shape == (3, 6, 8) and torch.equal(joined[1, :, :4], tensors[2].T)
    if transform is Transform.CONCAT_LAST:
        assert torch.equal(joined[..., :4], tensors[0])

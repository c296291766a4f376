"""Streaming loads: safetensors read block by block (interop/streaming.py) give exactly the tensors a whole read
and the key map's ``join`` give, in the precision asked for, and name the file when one is damaged."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file, save_file

from switchformer import ModelConfig, MoEConfig, build_model
from switchformer.interop import streaming
from switchformer.interop.checkpoint_io import from_pretrained, model_from_state_dict, open_checkpoint, save_pretrained
from switchformer.interop.files import read_weights
from switchformer.interop.hf_keys import from_hf_state_dict
from switchformer.interop.key_map import CheckpointError, ParamMapping, Transform, join
from switchformer.interop.streaming import SafetensorsFiles, _fill_block
from switchformer.moe.router import Router


def _config(**changes) -> ModelConfig:
    moe = MoEConfig(num_experts=4, grouping="sequence", expert_capacity=6)
    base = ModelConfig(vocab_size=64, d_model=32, d_ff=48, num_heads=4, num_layers=2, dropout=0.0, moe=moe)
    return base.replace(**changes)


def _hf_folder(tmp_path, **changes):
    model = build_model(_config(**changes), seed=3).eval()
    folder = save_pretrained(model, tmp_path / "hf", format="hf", max_shard_bytes=20_000)  # several shards
    return model, folder


def _blocks(shape: tuple[int, ...]):
    """A few blocks of ``shape``: whole, leading and trailing parts of each axis, and uneven middles."""
    spans = [[slice(0, n), slice(0, max(n // 3, 1)), slice(n // 3, n), slice(1, max(n - 1, 2))] for n in shape]
    return list(itertools.product(*spans))


@pytest.mark.parametrize(
    ("transform", "parts"),
    [
        (Transform.COPY, [(6, 5)]),
        (Transform.TRANSPOSE, [(5, 6)]),
        (Transform.CONCAT_ROWS, [(4, 5), (4, 5)]),  # [gate; linear]: blocks across the seam read both halves
        (Transform.STACK_T, [(6, 5)] * 3),  # 3 experts, each stored [out, in]
        (Transform.STACK_T_GATED, [(4, 5)] * 6),  # 3 experts x (gate, linear), our last axis [gate | linear]
    ],
)
def test_every_block_read_from_the_files_equals_that_block_of_the_joined_tensor(
    tmp_path, monkeypatch, transform, parts
):
    monkeypatch.setattr(streaming, "_PIECE_BYTES", 8)  # matrices read one row at a time
    names = [f"t{i}" for i in range(len(parts))]
    tensors = {name: torch.randn(shape) for name, shape in zip(names, parts, strict=True)}
    save_file(tensors, tmp_path / "model.safetensors")
    files = SafetensorsFiles.open(tmp_path)
    mapping = ParamMapping("ours", tuple(names), transform)
    whole = join(transform, [tensors[n] for n in names])
    for block in _blocks(tuple(whole.shape)):
        got = torch.full_like(whole[block], float("nan"))
        _fill_block(files, mapping, got, block, tuple(whole.shape))
        assert torch.equal(got, whole[block]), (transform, block)


def test_a_sharded_hf_folder_streams_into_the_weights_a_whole_read_gives(tmp_path):
    model, folder = _hf_folder(tmp_path, tie_word_embeddings=False)
    assert len(list(folder.glob("*.safetensors"))) > 3
    expected = model_from_state_dict(model.config, from_hf_state_dict(read_weights(folder), model.config))
    streamed = from_pretrained(folder)
    assert streamed.config == expected.config == model.config
    for (name, a), (_, b) in zip(streamed.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bf16_loads_keep_the_routers_float32_and_round_everything_else_once(tmp_path):
    model, folder = _hf_folder(tmp_path)
    loaded = from_pretrained(folder, dtype=torch.bfloat16)
    original = dict(model.named_parameters())
    routers = {f"{n}.{p}" for n, m in loaded.named_modules() if isinstance(m, Router) for p, _ in m.named_parameters()}
    assert routers
    for name, param in loaded.named_parameters():
        wanted = torch.float32 if name in routers else torch.bfloat16
        assert param.dtype == wanted, name
        assert torch.equal(param, original[name].detach().to(wanted)), name


def test_dtype_none_keeps_each_stored_precision(tmp_path):
    model = build_model(_config(), seed=1).eval()
    folder = save_pretrained(model.to(torch.bfloat16), tmp_path / "bf16")  # every weight bf16, routers too
    loaded = from_pretrained(folder, dtype=None)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters(), strict=True))


def test_reads_count_the_tensor_bytes_once_and_nothing_more(tmp_path):
    _, folder = _hf_folder(tmp_path)  # tied: one embedding table, nothing to compare
    stored = sum(t.numel() * t.element_size() for t in read_weights(folder).values())
    checkpoint = open_checkpoint(folder)
    assert checkpoint.files.bytes_read == 0  # opening reads the headers only
    target = build_model(checkpoint.config, device="meta")
    target.to_empty(device="cpu")
    assert checkpoint.fill(target) == stored == checkpoint.files.bytes_read


def test_a_damaged_shard_is_named_in_the_error(tmp_path):
    _, folder = _hf_folder(tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=shard.name):
        from_pretrained(folder)


def test_a_missing_shard_is_named_in_the_error(tmp_path):
    _, folder = _hf_folder(tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: weight file not found"):
        from_pretrained(folder)


def test_a_tensor_of_the_wrong_shape_is_refused_before_any_weight_is_read(tmp_path):
    _, folder = _hf_folder(tmp_path)
    files = SafetensorsFiles.open(folder)
    name = next(k for k in files.file_of if k.endswith("expert_0.wi.weight"))
    path = folder / files.file_of[name]
    tensors = load_file(path)
    tensors[name] = torch.zeros(5, 32)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"shape mismatch|cannot combine"):
        from_pretrained(folder)


def test_weights_read_whole_fill_one_model_and_are_released(tmp_path):
    model = build_model(_config(), seed=4).eval()
    folder = save_pretrained(model, tmp_path / "bin")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    checkpoint = open_checkpoint(folder)
    assert checkpoint.files is None and checkpoint.state is not None  # .bin files are read whole
    target = build_model(checkpoint.config, device="meta")
    target.to_empty(device="cpu")
    checkpoint.fill(target)
    assert checkpoint.state is None  # released as copied
    loaded, saved = target.state_dict(), model.state_dict()
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)
    with pytest.raises(RuntimeError, match="already filled a model"):
        checkpoint.fill(target)

"""Checkpoint folders: HF and switchformer formats, .bin and sharded weights, exact round trips, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from switchformer import ModelConfig, MoEConfig, build_model
from switchformer.interop.checkpoint_io import from_pretrained, load_config, save_pretrained
from switchformer.interop.files import copy_tokenizer_files
from switchformer.interop.hf_config import config_to_hf
from switchformer.interop.hf_keys import to_hf_state_dict
from switchformer.interop.key_map import CheckpointError
from tests.interop.hf_models import batch, ours_from_hf, tiny_hf, transformers


def _tiny(**changes) -> ModelConfig:
    moe = MoEConfig(num_experts=4, grouping="sequence", expert_capacity=6, ignore_padding_tokens=False)
    base = ModelConfig(
        vocab_size=64, d_model=32, d_ff=48, num_heads=4, num_layers=3, num_decoder_layers=2, dropout=0.0, moe=moe,
    )  # fmt: skip
    return base.replace(**changes)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("tied", [True, False])
def test_ours_to_hf_folder_to_ours_is_exact_and_transformers_loads_it(tmp_path, tied):
    torch.manual_seed(0)
    model = build_model(_tiny(tie_word_embeddings=tied, init_scale=0.1, moe=_tiny().moe.replace(router_bias=True)))
    model.eval()
    save_pretrained(model, tmp_path, format="hf")
    back = from_pretrained(tmp_path)
    assert back.config == model.config and _same_weights(back, model)

    hf_model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, mask, dec = batch()
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = model(ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["config.json", "model.safetensors"]


def test_hf_export_without_embedded_config_keeps_hf_semantics(tmp_path):
    """A folder written by transformers itself (no switchformer_config) loads with HF's routing semantics."""
    hf_model = tiny_hf(expert_capacity=3)
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.config == ours_from_hf(hf_model).config
    assert model.config.moe.expert_capacity == 3 and model.config.moe.grouping.value == "sequence"
    assert _same_weights(model, ours_from_hf(hf_model))
    assert not model.training


def test_sharded_safetensors_written_by_transformers_load(tmp_path):
    hf_model = tiny_hf(tie_word_embeddings=False)
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert _same_weights(from_pretrained(tmp_path), ours_from_hf(hf_model))


def test_pytorch_bin_with_tied_duplicates_loads(tmp_path):
    """Older checkpoints are pickled state dicts holding every tied copy (embed_tokens, lm_head)."""
    hf_model = tiny_hf()
    hf_model.config.save_pretrained(tmp_path)
    state = hf_model.state_dict() | {"lm_head.weight": hf_model.shared.weight}
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert _same_weights(from_pretrained(tmp_path), ours_from_hf(hf_model))


def test_switchformer_format_round_trips_any_config_sharded(tmp_path):
    torch.manual_seed(0)
    config = _tiny(architecture="decoder-only", activation="gated-silu", moe=MoEConfig(num_experts=4, top_k=2))
    model = build_model(config)
    save_pretrained(model, tmp_path, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    back = from_pretrained(tmp_path, dtype=None)
    assert load_config(tmp_path) == config and _same_weights(back, model)
    # Saving again unsharded replaces the shards instead of leaving two sets of weights behind.
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_dense_model_exports_with_no_switch_layer(tmp_path):
    model = build_model(_tiny(moe=None)).eval()
    save_pretrained(model, tmp_path, format="hf")
    hf_model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path)
    assert not any("router" in name for name in hf_model.state_dict())
    assert from_pretrained(tmp_path).config.moe is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architecture": "decoder-only"}, "encoder-decoder only"),
        ({"activation": "gated-gelu"}, "no gated FFN"),
        ({"moe": MoEConfig(num_experts=4, top_k=2)}, "top-1 only"),
        ({"moe": MoEConfig(num_experts=4, gate="straight-through")}, "router probability"),
        ({"num_layers": 8, "sparse_every": 3}, "no equivalent in transformers"),
    ],
)
def test_hf_export_refuses_what_transformers_cannot_run(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        save_pretrained(build_model(_tiny(**changes)), tmp_path / "out", format="hf")
    assert not (tmp_path / "out").exists()  # nothing written


def _hf_folder(tmp_path):
    hf_model = tiny_hf()
    hf_model.save_pretrained(tmp_path)
    return hf_model


def _rewrite_weights(path, edit):
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_errors_name_the_folder_and_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        from_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"unknown checkpoint format.*'bert'"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "switchformer", "model": {"d_model": -1}}))
    with pytest.raises(CheckpointError, match=r"config\.json: ModelConfig\.d_model=-1"):
        from_pretrained(tmp_path)
    save_pretrained(build_model(_tiny()), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no weights found"):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("encoder.block.1.layer.1.mlp.experts.expert_2.wo.weight"), "missing.*expert_2.wo"),
        (lambda s: s.update({"encoder.block.9.extra.weight": torch.zeros(1)}), "unexpected.*block.9.extra"),
        (lambda s: s.update({"decoder.final_layer_norm.weight": torch.ones(31)}), r"shape mismatch.*\(32,\).*\(31,\)"),
        (lambda s: s.update({"encoder.embed_tokens.weight": torch.zeros(64, 32)}), "differs from shared.weight"),
    ],
    ids=["missing", "unexpected", "shape", "untied-embedding"],
)
def test_weight_errors_name_the_key(tmp_path, edit, message):
    _hf_folder(tmp_path)
    _rewrite_weights(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as error:
        from_pretrained(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_a_placement_that_disagrees_with_the_weights_is_a_clear_error(tmp_path):
    """A dense decoder loads (a layout transformers can build), but not over weights holding a Switch layer."""
    _hf_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_sparse_decoder_layers": 5}))  # decoder dense
    assert load_config(tmp_path).decoder_sparse_layers == ()
    message = r"missing: \[decoder\.block\.1\.layer\.2\.mlp\.wi\.weight, .*does config\.json describe these weights"
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(tmp_path)


def test_gated_checkpoint_in_t5_1_1_naming_loads(tmp_path):
    """Switch-XXL style: dense_act_fn='gated-gelu', wi_0 (gate) and wi_1 (linear) per expert and dense FFN."""
    torch.manual_seed(0)
    model = build_model(_tiny(activation="gated-gelu", tie_word_embeddings=False))
    hf_state = to_hf_state_dict(model.state_dict(), model.config)
    expert = model.encoder.blocks[1].ffn.experts.wi[2]  # [D, 2F]
    assert torch.equal(hf_state["encoder.block.1.layer.1.mlp.experts.expert_2.wi_0.weight"], expert[:, :48].T)
    assert torch.equal(hf_state["encoder.block.0.layer.1.mlp.wi_1.weight"], model.encoder.blocks[0].ffn.wi.weight[48:])
    save_file(hf_state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    fields = config_to_hf(model.config.replace(activation="relu")) | {"dense_act_fn": "gated-gelu"}
    del fields["switchformer_config"]
    (tmp_path / "config.json").write_text(json.dumps(fields))
    back = from_pretrained(tmp_path)
    assert back.config.activation.value == "gated-gelu" and _same_weights(back, model)
    # T5's feed_forward_proj is ignored, as transformers' Switch port ignores it: these weights disagree with a
    # config that says ReLU, and the error says which field decides.
    (tmp_path / "config.json").write_text(
        json.dumps(fields | {"dense_act_fn": "relu", "feed_forward_proj": "gated-gelu"})
    )
    with pytest.raises(
        CheckpointError, match=r"gated \(wi_0, wi_1\) FFNs but the config's activation is 'relu'.*dense_act_fn"
    ):
        from_pretrained(tmp_path)


def test_a_feed_forward_proj_transformers_ignores_leaves_the_model_as_transformers_runs_it(tmp_path):
    hf_model = _hf_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"feed_forward_proj": "gated-gelu"}))
    theirs = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path).eval()
    ours = from_pretrained(tmp_path)
    assert ours.config.activation.value == "relu" and _same_weights(ours, ours_from_hf(hf_model))
    ids, mask, dec = batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sharded_pytorch_bin_loads_and_a_missing_shard_is_named(tmp_path):
    hf_model = tiny_hf()
    hf_model.config.save_pretrained(tmp_path)
    state = hf_model.state_dict()
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in shards.items():
        torch.save({key: state[key] for key in part}, tmp_path / name)
    weight_map = {key: name for name, part in shards.items() for key in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert _same_weights(from_pretrained(tmp_path), ours_from_hf(hf_model))
    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002\.bin: weight file not found"):
        from_pretrained(tmp_path)


def test_saving_removes_only_stale_weight_files(tmp_path):
    (tmp_path / "model-00001-of-00003.safetensors").write_bytes(b"old shard")
    (tmp_path / "pytorch_model.bin").write_bytes(b"old weights")
    (tmp_path / "model-card.json").write_text("{}")  # not weights: kept
    save_pretrained(build_model(_tiny()), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model-card.json", "model.safetensors"]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_tokenizer_files_travel_with_a_conversion(tmp_path):
    source, destination = tmp_path / "hf", tmp_path / "ours"
    source.mkdir()
    (source / "tokenizer.json").write_text('{"version": "1.0"}')
    (source / "spiece.model").write_bytes(b"\x00sentencepiece")
    destination.mkdir()
    assert copy_tokenizer_files(source, destination) == ["tokenizer.json", "spiece.model"]
    assert (destination / "spiece.model").read_bytes() == b"\x00sentencepiece"

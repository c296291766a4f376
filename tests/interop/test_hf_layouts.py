"""Every layout transformers' Switch port can build loads: Switch layers placed per stack, stacks of different
depths, dense stacks, and untied input embeddings as transformers 5 draws them. Each loads with transformers'
logits and greedy tokens, and exports back to the same tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from switchformer.interop.checkpoint_io import from_pretrained, save_pretrained
from switchformer.interop.hf_config import config_from_hf, config_to_hf
from switchformer.interop.hf_keys import from_hf_state_dict
from switchformer.interop.key_map import CheckpointError
from switchformer.models.config import InputEmbeddings, Stack
from switchformer.models.generation import GenerationConfig, generate
from tests.interop.hf_models import BASE, batch, ours_from_hf, tiny_hf, transformers

LAYOUTS = {
    "all-sparse-encoder-half-sparse-decoder": {
        "num_layers": 3,
        "num_sparse_encoder_layers": 3,
        "num_decoder_layers": 2,
        "num_sparse_decoder_layers": 1,
    },
    "dense-encoder-all-sparse-decoder": {
        "num_layers": 2,
        "num_sparse_encoder_layers": 3,  # more than num_layers: transformers' step 0, a dense stack
        "num_decoder_layers": 3,
        "num_sparse_decoder_layers": 3,
    },
    "1-encoder-layer-4-decoder-layers": {
        "num_layers": 1,
        "num_sparse_encoder_layers": 1,
        "num_decoder_layers": 4,
        "num_sparse_decoder_layers": 2,
    },
    "untied-own-stack-tables": {"tie_word_embeddings": False, "own_stack_tables": True},
    "untied-own-stack-tables-per-stack-layout": {
        "tie_word_embeddings": False,
        "own_stack_tables": True,
        "num_layers": 3,
        "num_sparse_encoder_layers": 3,
        "num_sparse_decoder_layers": 1,
    },
}


def _hf_sparse_blocks(model) -> dict[Stack, tuple[int, ...]]:
    return {
        stack: tuple(i for i, block in enumerate(getattr(model, stack.value).block) if block.is_sparse)
        for stack in Stack
    }


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("num_decoder_layers", [1, 2, 4])
def test_every_placement_transformers_builds_loads_and_exports_back(num_layers, num_decoder_layers):
    """All ``num_sparse_*_layers`` from 0 to past the depth: our blocks are sparse exactly where transformers'
    are, and the exported config.json makes transformers build the same layout again."""
    for enc_sparse in range(num_layers + 2):
        for dec_sparse in range(num_decoder_layers + 2):
            fields = BASE | {
                "num_layers": num_layers,
                "num_decoder_layers": num_decoder_layers,
                "num_sparse_encoder_layers": enc_sparse,
                "num_sparse_decoder_layers": dec_sparse,
            }
            with torch.device("meta"):
                expected = _hf_sparse_blocks(
                    transformers.SwitchTransformersModel(transformers.SwitchTransformersConfig(**fields))
                )
            config = config_from_hf(fields)
            got = {stack: config.switch_layers(stack) for stack in Stack}
            assert got == expected, fields
            exported = config_to_hf(config)
            with torch.device("meta"):
                again = transformers.SwitchTransformersModel(transformers.SwitchTransformersConfig(**exported))
            assert _hf_sparse_blocks(again) == expected, fields
            assert config_from_hf(exported) == config


def _greedy(hf_model, ours, ids, mask):
    """Ours decodes with its KV cache; transformers without (its cache assumes the decoder has ``num_layers``
    layers, and fails on a deeper decoder)."""
    expected = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
    got = generate(ours, input_ids=ids, attention_mask=mask, config=GenerationConfig(max_new_tokens=8))
    return got.sequences, expected


@pytest.mark.parametrize("changes", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_layout_loads_with_transformers_logits_and_greedy_tokens_and_exports_bitwise(tmp_path, changes):
    """Logits within 1e-5 of the largest in float32 (both route in float32: about 5e-7 here; weights three times
    the usual scale make float32 itself differ from float64 by 1e-4, so they serve greedy decoding only)."""
    hf_model = tiny_hf(**changes)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    assert ours.config == ours_from_hf(hf_model).config
    stacks = _hf_sparse_blocks(hf_model)
    assert {stack: ours.config.switch_layers(stack) for stack in Stack} == stacks
    own_tables = changes.get("own_stack_tables", False)
    assert (ours.config.input_embeddings is InputEmbeddings.PER_STACK) == own_tables

    ids, mask, dec = batch()
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    varied = tiny_hf(weight_scale=3.0, **changes)
    tokens, hf_tokens = _greedy(varied, ours_from_hf(varied), ids, mask)
    assert torch.equal(tokens, hf_tokens)
    assert len(set(tokens[:, 1:].flatten().tolist())) > 3  # varied continuations, not one repeated token

    save_pretrained(ours, tmp_path / "back", format="hf")
    theirs, back = (
        load_file(str(tmp_path / "hf" / "model.safetensors")),
        load_file(str(tmp_path / "back" / "model.safetensors")),
    )
    assert set(back) == set(theirs)
    # An untied model's shared.weight is read by nothing in transformers' forward: the export writes the
    # encoder's table there. Every tensor the forward reads comes back bit for bit.
    unread = {"shared.weight"} if changes.get("tie_word_embeddings") is False else set()
    assert all(torch.equal(back[key], theirs[key]) for key in set(theirs) - unread)
    if unread:
        assert torch.equal(back["shared.weight"], theirs["encoder.embed_tokens.weight"])
        assert own_tables and not torch.equal(
            theirs["encoder.embed_tokens.weight"], theirs["decoder.embed_tokens.weight"]
        )
    reloaded = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        # transformers keeps the weights in the file's memory map, where a tensor's address follows the header's
        # length (not 64-byte aligned); the matrix library may then take another kernel path and round the last
        # bit differently. In fresh memory, as the original's, the same weights give the same logits bit for bit.
        for param in reloaded.parameters():
            param.data = param.data.clone()
        again = reloaded(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.equal(again, expected)


def test_tied_checkpoints_keep_one_table(tmp_path):
    hf_model = tiny_hf()
    hf_model.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.config.input_embeddings is InputEmbeddings.SHARED and ours.decoder_embed is None
    assert ours.lm_head is None and "decoder_embed.weight" not in ours.state_dict()


def test_untied_checkpoints_with_one_table_keep_one_table(tmp_path):
    """transformers 4 tied the stacks' tables to ``shared`` even when untied: such checkpoints keep one table."""
    hf_model = tiny_hf(tie_word_embeddings=False)
    hf_model.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.config.input_embeddings is InputEmbeddings.SHARED and ours.lm_head is not None
    assert torch.equal(ours.shared.weight, hf_model.encoder.embed_tokens.weight)


def test_per_stack_tables_feed_their_own_stack():
    """The decoder reads ``decoder_embed``, the encoder ``shared``: changing one leaves the other stack alone."""
    ours = ours_from_hf(tiny_hf(tie_word_embeddings=False, own_stack_tables=True))
    ids, mask, dec = batch()
    with torch.no_grad():
        before = ours(ids, attention_mask=mask, decoder_input_ids=dec)
        ours.decoder_embed.weight.mul_(2.0)
        after = ours(ids, attention_mask=mask, decoder_input_ids=dec)
    assert torch.equal(before.encoder_hidden_states, after.encoder_hidden_states)
    assert not torch.allclose(before.logits, after.logits)


def test_a_shared_table_config_refuses_weights_with_two_tables():
    hf_model = tiny_hf(tie_word_embeddings=False, own_stack_tables=True)
    config = config_from_hf(hf_model.config)  # one table: the weights alone tell there are two
    with pytest.raises(
        CheckpointError, match=r"decoder\.embed_tokens\.weight differs from encoder\.embed_tokens\.weight"
    ):
        from_hf_state_dict(hf_model.state_dict(), config)


def test_checkpoints_saved_before_per_stack_placement_still_load(tmp_path):
    """A switchformer config.json written before the per-stack fields existed (``sparse_every`` only) loads."""
    model = ours_from_hf(
        tiny_hf(num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)
    )
    save_pretrained(model, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    for field in ("sparse_layers", "decoder_sparse_layers", "input_embeddings"):
        del data["model"][field]
    (tmp_path / "config.json").write_text(json.dumps(data))
    back = from_pretrained(tmp_path)
    assert back.config == model.config and back.config.sparse_every == 2
    assert back.config.switch_layers(Stack.ENCODER) == back.config.switch_layers(Stack.DECODER) == (1, 3)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())

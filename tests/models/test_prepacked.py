"""Decoding on packed weights gives the stored weights' tokens and scores, leaves the model as it was, keeps its
copies for the next call, follows a training step and lets go of them in training mode."""

from __future__ import annotations

import pytest
import torch

from switchformer import ExpertKernel, build_model
from switchformer.layers.activation import Activation
from switchformer.layers.prepacked import packed_copies_of
from switchformer.models.generation import generate
from switchformer.models.prepacked import prepack_possible, prepacked_decoder
from tests.models.conftest import small_config

CASES = {
    "encoder-decoder-loop": small_config(),
    "encoder-decoder-padded-untied": small_config(tie_word_embeddings=False).replace(
        moe=small_config().moe.replace(kernel=ExpertKernel.PADDED_BMM, dropless=False, expert_capacity=3)
    ),
    "decoder-only-gated": small_config("decoder-only", activation=Activation.GATED_GELU),
    "dense": small_config(sparse=False),
}


def _model(config, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config.replace(init_scale=1.0)).eval()


def _prompt(model):
    ids = torch.randint(2, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("config", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_packed_decoding_equals_the_stored_weights(config, strategy):
    model = _model(config)
    ids, mask = _prompt(model)
    plain = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=8, strategy=strategy,
                     prepack_weights=False)  # fmt: skip
    assert packed_copies_of(model).nbytes == 0
    packed = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=8, strategy=strategy)
    assert packed_copies_of(model).nbytes > 0  # the packed path ran
    assert torch.equal(packed.sequences, plain.sequences)
    torch.testing.assert_close(packed.scores, plain.scores, atol=1e-5, rtol=1e-5)


def test_the_model_is_as_it_was_after_decoding_even_when_it_fails():
    model = _model(CASES["encoder-decoder-loop"])
    modules = [(name, type(module)) for name, module in model.named_modules()]
    keys = list(model.state_dict())
    with pytest.raises(IndexError, match="out of range"), torch.no_grad(), prepacked_decoder(model) as on:
        assert on
        assert any(type(m).__name__ == "PrepackedLinear" for m in model.decoder.modules())
        model.generate(input_ids=torch.full((1, 3), 10_000), max_new_tokens=2)  # ids past the vocabulary
    assert [(name, type(module)) for name, module in model.named_modules()] == modules
    assert list(model.state_dict()) == keys and "output_linear" not in model.__dict__


def test_copies_are_reused_follow_a_training_step_and_go_in_training_mode():
    model = _model(CASES["encoder-decoder-loop"])
    ids, mask = _prompt(model)
    generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4)
    copies = packed_copies_of(model)
    entries = dict(copies._entries)
    generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert all(copies._entries[key] is entry for key, entry in entries.items())  # nothing packed again

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    optimizer.step()  # in place: every weight's version moves
    packed = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=6)
    plain = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=6, prepack_weights=False)
    assert torch.equal(packed.sequences, plain.sequences)
    torch.testing.assert_close(packed.scores, plain.scores, atol=1e-5, rtol=1e-5)

    model.train()
    assert packed_copies_of(model).nbytes == 0


def test_packing_applies_to_inference_on_cpu_weights_oneDNN_takes_only():
    model = _model(CASES["encoder-decoder-loop"])
    with torch.no_grad():
        assert prepack_possible(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not prepack_possible(model)
        assert not prepack_possible(model.train())
        assert not prepack_possible(_model(CASES["dense"]).double())
    assert not prepack_possible(model.eval())  # autograd on

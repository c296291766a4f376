"""A compiled decoding step (``generate(compile=True)``) gives the eager steps' tokens and scores, for both model
types, dropped tokens, beams and left-padded prompts; it follows a weight change, goes in training mode, and says
why it cannot run."""

from __future__ import annotations

import pytest
import torch

from switchformer import ExpertKernel, build_model
from switchformer.layers.activation import Activation
from switchformer.models import compiled_decoding
from switchformer.models.generation import generate
from tests.models.conftest import small_config

PADDED_WITH_DROPS = small_config(tie_word_embeddings=False).replace(
    moe=small_config().moe.replace(kernel=ExpertKernel.PADDED_BMM, dropless=False, expert_capacity=1, group_size=3)
)
# Each case compiles a step (tens of seconds on 2 cores before inductor's caches are warm): one in the default run.
CASES = [
    pytest.param(small_config(), "greedy", id="encoder-decoder-greedy"),
    pytest.param(PADDED_WITH_DROPS, "beam", id="encoder-decoder-drops-beam", marks=pytest.mark.slow),
    pytest.param(
        small_config("decoder-only", activation=Activation.GATED_GELU),
        "sample",
        id="decoder-only-left-padded-sample",
        marks=pytest.mark.slow,
    ),
]


def _model(config, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config.replace(init_scale=1.0)).eval()


def _prompt(model):
    ids = torch.randint(2, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if not model.config.is_encoder_decoder:  # left padding, of different lengths
        mask[1, :2] = 0
        mask[2, :1] = 0
    else:
        mask[1, -2:] = 0
    return ids, mask


@pytest.mark.parametrize("config, strategy", CASES)
def test_compiled_steps_give_the_eager_steps_tokens_and_scores(config, strategy):
    model = _model(config)
    ids, mask = _prompt(model)
    options = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 7, "strategy": strategy}
    eager = generate(model, **options)
    compiled = generate(model, **options, compile=True)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.equal(compiled.num_generated, eager.num_generated)
    torch.testing.assert_close(compiled.scores, eager.scores, atol=1e-4, rtol=1e-4)
    assert compiled_decoding._STEPS[model].layers  # the Switch layers ran as the custom op
    blocks = model.decoder.blocks
    assert not any(isinstance(b.ffn, compiled_decoding.OpaqueSwitchLayer) for b in blocks)  # put back after


@pytest.mark.slow
def test_a_changed_weight_compiles_again_and_training_mode_drops_the_step():
    model = _model(small_config())
    ids, mask = _prompt(model)
    generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=5, compile=True)
    first = compiled_decoding._STEPS[model]

    with torch.no_grad():
        model.decoder.blocks[0].self_attn.q.weight.mul_(-3.0)  # in place: same tensor, new version
        model.shared.weight[5:9] *= 4.0
    compiled = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=5, compile=True)
    assert compiled_decoding._STEPS[model] is not first
    eager = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(compiled.scores, eager.scores, atol=1e-4, rtol=1e-4)

    model.train()
    assert model not in compiled_decoding._STEPS


def test_compiling_in_training_mode_or_with_autograd_says_why():
    model = _model(small_config())
    ids, mask = _prompt(model)
    with pytest.raises(ValueError, match=r"training mode; call model\.eval\(\)"):
        generate(model.train(), input_ids=ids, attention_mask=mask, max_new_tokens=2, compile=True)
    model.eval()
    assert compiled_decoding.compile_possible(model) == "autograd is on; generate() runs under torch.no_grad()"
    with torch.no_grad():
        assert compiled_decoding.compile_possible(model) is None

"""Where Switch layers go, stack by stack: ``sparse_every``'s rule or explicit per-stack lists; the model built,
the parameter and FLOP counts and the validation all follow them."""

from __future__ import annotations

import pytest
import torch

from switchformer import ConfigError, build_model, get_preset
from switchformer.cli.main import main
from switchformer.models.config import InputEmbeddings, Stack
from switchformer.models.flops import count_parameters, flops_per_token
from switchformer.moe.layer import SwitchFFN
from tests.models.conftest import small_config


def _built(model) -> dict[Stack, tuple[int, ...]]:
    stacks = {Stack.DECODER: model.decoder}
    if hasattr(model, "encoder"):
        stacks[Stack.ENCODER] = model.encoder
    return {
        s: tuple(i for i, b in enumerate(stack.blocks) if isinstance(b.ffn, SwitchFFN)) for s, stack in stacks.items()
    }


def test_presets_keep_every_other_layer_in_both_stacks():
    config = get_preset("switch-base-8")
    assert config.sparse_layers is None and config.decoder_sparse_layers is None
    assert config.switch_layers(Stack.ENCODER) == config.switch_layers(Stack.DECODER) == (1, 3, 5, 7, 9, 11)
    assert get_preset("switch-c-2048").switch_layers(Stack.DECODER) == tuple(range(15))
    assert get_preset("t5-base").num_switch_layers == 0


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"num_layers": 3, "num_decoder_layers": 2, "sparse_layers": (0, 1, 2), "decoder_sparse_layers": (1,)},
            {Stack.ENCODER: (0, 1, 2), Stack.DECODER: (1,)},
        ),
        ({"sparse_layers": (), "sparse_every": 1}, {Stack.ENCODER: (), Stack.DECODER: (0, 1, 2)}),
        (
            {"num_layers": 1, "num_decoder_layers": 4, "decoder_sparse_layers": (1, 3)},
            {Stack.ENCODER: (), Stack.DECODER: (1, 3)},
        ),
    ],
    ids=["all-sparse-encoder-half-sparse-decoder", "dense-encoder-all-sparse-decoder", "1-and-4-layers"],
)
def test_each_stack_is_built_as_its_placement_says(changes, expected):
    config = small_config(**changes)
    assert {stack: config.switch_layers(stack) for stack in Stack} == expected
    torch.manual_seed(0)
    model = build_model(config)
    assert _built(model) == expected
    assert config.num_switch_layers == sum(len(v) for v in expected.values())
    ids = torch.randint(2, 97, (2, 6))
    out = model(ids, labels=ids[:, :4])
    assert [r.name for r in out.router] == [f"{s.value}.{i}" for s in Stack for i in expected[s]]
    out.loss.backward()


def test_decoder_only_models_place_their_one_stack_with_sparse_layers():
    config = small_config("decoder-only", num_layers=4, sparse_layers=(0, 2))
    assert _built(build_model(config)) == {Stack.DECODER: (0, 2)}


def test_counts_follow_the_per_stack_placement():
    """A dense encoder and an all-sparse decoder: each Switch layer adds (E - 1) experts' weights and a router to the
    dense twin's parameters, and only its router's FLOPs."""
    config = small_config(sparse_every=1, sparse_layers=())  # 2 dense encoder layers, 3 Switch decoder layers
    dense_total, _ = count_parameters(config.dense())
    total, active = count_parameters(config)
    d, f, experts = 32, 48, 4
    expert, router = 2 * d * f, d * experts
    assert total == dense_total + 3 * ((experts - 1) * expert + router)
    assert active == dense_total + 3 * router
    assert flops_per_token(config) == flops_per_token(config.dense()) + 2 * 3 * router


def test_info_prints_each_stacks_switch_layers(capsys):
    overrides = ["--set", "num_layers=3", "--set", "sparse_layers=[]", "--set", "decoder_sparse_layers=0,2"]
    assert main(["info", "switch-tiny-8", *overrides]) == 0
    out = capsys.readouterr().out
    assert "0 of 3: none (dense)" in out and "2 of 3: 0, 2" in out


@pytest.mark.parametrize(
    ("changes", "field", "allowed"),
    [
        ({"sparse_layers": (2, 1)}, "sparse_layers", "strictly increasing"),
        ({"sparse_layers": (1, 1)}, "sparse_layers", "strictly increasing"),
        ({"decoder_sparse_layers": (3,)}, "decoder_sparse_layers", r"\[0, 3\)"),
        ({"sparse_layers": (-1,)}, "sparse_layers", r"\[0, 2\)"),
        ({"architecture": "decoder-only", "decoder_sparse_layers": (1,)}, "decoder_sparse_layers", "decoder-only"),
        ({"input_embeddings": "per-stack"}, "input_embeddings", "tie_word_embeddings=false"),
        (
            {"input_embeddings": "per-stack", "tie_word_embeddings": False, "architecture": "decoder-only"},
            "input_embeddings",
            "encoder-decoder",
        ),
    ],
)
def test_invalid_placements_and_embeddings_name_the_field(changes, field, allowed):
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{field}=.* is invalid: .*{allowed}"):
        small_config(**changes)


def test_per_stack_embeddings_give_the_decoder_its_own_table():
    config = small_config(tie_word_embeddings=False, input_embeddings=InputEmbeddings.PER_STACK)
    torch.manual_seed(0)
    model = build_model(config)
    assert model.decoder_embedding is model.decoder_embed and model.decoder_embed is not model.shared
    assert 0.9 < float(model.decoder_embed.weight.detach().std()) < 1.1  # initialised like the shared table
    total, _ = count_parameters(config)
    assert total == count_parameters(config.replace(input_embeddings="shared"))[0] + 97 * 32

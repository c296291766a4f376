"""Generation with every expert layout equals ``transformers``' on the same weights, greedy and beam, with a fixed
capacity large against a decoding step's tokens and with one small enough to drop; cached decoding equals a full
forward; bf16 weights keep float32 routers."""

from __future__ import annotations

import pytest
import torch

from switchformer import ExpertKernel, build_model, from_pretrained
from switchformer.models.generation import GenerationConfig, generate
from switchformer.moe.router import Router

hf_models = pytest.importorskip("tests.interop.hf_models")

KERNELS = [kernel.value for kernel in ExpertKernel]


@pytest.fixture(scope="module", params=[64, 2], ids=["capacity-64", "capacity-2"])
def hf_model(request):
    return hf_models.tiny_hf(weight_scale=3.0, expert_capacity=request.param)


def _ours(hf_model, kernel: str):
    twin = hf_models.ours_from_hf(hf_model)
    config = twin.config.replace(moe=twin.config.moe.replace(kernel=ExpertKernel(kernel)))
    model = build_model(config).eval()
    model.load_state_dict(twin.state_dict())
    return model


@pytest.mark.parametrize("kernel", KERNELS)
def test_greedy_tokens_equal_transformers_with_every_layout(hf_model, kernel):
    ids, mask, _ = hf_models.batch(size=4)
    expected = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got = generate(_ours(hf_model, kernel), input_ids=ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(got.sequences, expected)


@pytest.mark.parametrize("kernel", KERNELS)
def test_beam_search_equals_transformers_with_every_layout(hf_model, kernel):
    ids, mask, _ = hf_models.batch(size=2)
    expected = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=4, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)  # fmt: skip
    config = GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=8)
    got = generate(_ours(hf_model, kernel), input_ids=ids, attention_mask=mask, config=config)
    for row, n in enumerate(got.num_generated.tolist()):
        assert torch.equal(got.sequences[row, : n + 1], expected.sequences[row, : n + 1])
    torch.testing.assert_close(got.scores, expected.sequences_scores, atol=1e-5, rtol=1e-5)


def test_cached_decoding_equals_a_full_forward_when_the_capacity_never_binds():
    """Each cached step routes its one new token as a group; a full forward routes the whole decoder sequence as one
    group. With capacity 64 against at most 12 tokens nothing is dropped either way, so the logits agree."""
    model = _ours(hf_models.tiny_hf(weight_scale=3.0, expert_capacity=64), "auto")
    ids, mask, _ = hf_models.batch(size=3)
    out = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=10)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1]).logits
    assert torch.equal(out.sequences[:, 1:], full.argmax(-1))
    expected = full.log_softmax(-1).gather(2, out.sequences[:, 1:, None]).squeeze(-1).sum(1)
    torch.testing.assert_close(out.scores, expected, atol=1e-4, rtol=1e-5)


def test_bf16_weights_keep_float32_routers_and_decode_close_to_float32(tmp_path):
    hf_model = hf_models.tiny_hf(weight_scale=1.0)  # a larger scale amplifies bf16's rounding layer by layer
    hf_model.save_pretrained(tmp_path)
    full = from_pretrained(tmp_path)
    half = from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, param in half.named_parameters():
        router = any(isinstance(m, Router) and name.endswith(f"{n}.weight") for n, m in half.named_modules())
        assert param.dtype == (torch.float32 if router else torch.bfloat16), name
    for (name, p_full), p_half in zip(full.named_parameters(), half.parameters(), strict=True):
        if p_half.dtype == torch.float32:
            assert torch.equal(p_full, p_half), f"{name} was rounded"
    ids, mask, dec = hf_models.batch(size=2)
    with torch.no_grad():
        want = full(ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = half(ids, attention_mask=mask, decoder_input_ids=dec).logits.float()
    assert float((got - want).abs().max() / want.abs().max()) < 0.05
    out = generate(half, input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert out.sequences.shape == (2, 5) and torch.isfinite(out.scores).all()

"""Generation: greedy and beam search equal ``transformers``' on the same weights, the KV cache matches a full
forward, sampling is reproducible and respects its filters, decoder-only prompts may be left-padded."""

from __future__ import annotations

import pytest
import torch

from switchformer import ConfigError, build_model
from switchformer.models.generation import DecodingStrategy, GenerationConfig, filter_logits, generate
from tests.models.conftest import small_config

ARCHS = ["encoder-decoder", "decoder-only"]


def _varied_model(arch: str, seed: int = 0):
    """Untied logits and a large init scale, so greedy decoding does not just repeat one token."""
    torch.manual_seed(seed)
    return build_model(small_config(arch, init_scale=3.0, tie_word_embeddings=False)).eval()


def _prompts(batch: int = 3, length: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _prompt_ending_after(model, tokens: int, strategy: str = "greedy") -> tuple[torch.Tensor, GenerationConfig]:
    """A one-row prompt and a config (``strategy``, 2 beams, 10 new tokens) whose ``eos_token_id`` (a token greedy
    decoding produces at that point) ends the continuation after exactly ``tokens`` tokens."""
    for seed in range(1, 100):
        prompts = _prompts(batch=1, seed=seed)
        greedy = generate(model, input_ids=prompts, max_new_tokens=tokens).sequences[0, -tokens:].tolist()
        config = GenerationConfig(strategy=strategy, max_new_tokens=10, eos_token_id=greedy[-1], num_beams=2)
        if generate(model, input_ids=prompts, config=config).num_generated.tolist() == [tokens]:
            return prompts, config
    raise AssertionError(f"no prompt of 100 makes {strategy} decoding end after {tokens} tokens")


def _full_forward_logits(model, prompts: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """Logits predicting each generated token, from one forward pass over the whole sequence (no cache)."""
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(prompts, decoder_input_ids=sequences[:, :-1]).logits
        return model(sequences[:, :-1]).logits[:, prompts.shape[1] - 1 :]


# -- parity with transformers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_pair():
    hf_models = pytest.importorskip("tests.interop.hf_models")
    hf_model = hf_models.tiny_hf(weight_scale=3.0, expert_capacity=2)  # capacity 2 per step: still one token
    return hf_model, hf_models.ours_from_hf(hf_model), hf_models.batch()


def test_greedy_tokens_equal_transformers_generate(hf_pair):
    hf_model, ours, (ids, mask, _) = hf_pair
    first = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    eos = int(first[0, 3])  # a token the first row emits early, so that row finishes before the others
    expected = hf_model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos
    )
    config = GenerationConfig(max_new_tokens=12, eos_token_id=eos)
    got = generate(ours, input_ids=ids, attention_mask=mask, config=config)
    assert torch.equal(got.sequences, expected)
    assert got.num_generated[0] <= 3 < got.num_generated.max()
    assert len(set(got.sequences[2].tolist())) > 3  # a varied continuation, not one repeated token


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_equals_transformers(hf_pair, length_penalty):
    hf_model, ours, (ids, mask, _) = hf_pair
    eos = int(hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)[0, 3])
    expected = hf_model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=3, length_penalty=length_penalty,
        eos_token_id=eos, do_sample=False, output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    config = GenerationConfig(
        strategy="beam", num_beams=3, max_new_tokens=12, length_penalty=length_penalty, eos_token_id=eos
    )
    got = generate(ours, input_ids=ids, attention_mask=mask, config=config)
    for row, n in enumerate(got.num_generated.tolist()):  # transformers pads finished beams differently
        assert torch.equal(got.sequences[row, : n + 1], expected.sequences[row, : n + 1])
        assert (got.sequences[row, n + 1 :] == ours.config.pad_token_id).all()
    torch.testing.assert_close(got.scores, expected.sequences_scores, atol=1e-5, rtol=1e-5)


# -- the KV cache -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_with_cache_matches_a_full_forward(arch):
    model = _varied_model(arch)
    prompts = _prompts()
    first = generate(model, input_ids=prompts, config=GenerationConfig(max_new_tokens=8))
    eos = int(first.sequences[0, -6])  # the first row stops after three tokens
    out = generate(model, input_ids=prompts, config=GenerationConfig(max_new_tokens=8, eos_token_id=eos))
    generated = out.sequences[:, -8:]
    full = _full_forward_logits(model, prompts, out.sequences)  # [B, 8, V]
    valid = torch.arange(8) < out.num_generated[:, None]  # pad follows eos
    assert not valid.all() and valid.sum(1).max() == 8  # one row stopped early
    assert torch.equal(generated[valid], full.argmax(-1)[valid])  # every greedy step saw the full-forward logits
    expected = (full.log_softmax(-1).gather(2, generated[..., None]).squeeze(-1) * valid).sum(1)
    torch.testing.assert_close(out.scores, expected, atol=1e-5, rtol=1e-5)

    # Step by step through the public API: the same logits as the full forward, position by position.
    cache, logits = None, []
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            memory = model.encode(prompts)
            for t in range(8):
                step = model(decoder_input_ids=out.sequences[:, t : t + 1], encoder_output=memory, cache=cache,
                             use_cache=True)  # fmt: skip
                cache = step.cache
                logits.append(step.logits[:, -1])
        else:
            step = model(prompts, use_cache=True)
            logits.append(step.logits[:, -1])
            for t in range(7):
                step = model(generated[:, t : t + 1], cache=step.cache, use_cache=True)
                logits.append(step.logits[:, -1])
    torch.testing.assert_close(torch.stack(logits, 1), full, atol=1e-5, rtol=1e-5)


# -- strategies -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_with_one_beam_is_greedy(arch):
    model = _varied_model(arch)
    prompts = _prompts()
    greedy = generate(model, input_ids=prompts, config=GenerationConfig(max_new_tokens=10))
    # The first token of the first row's continuation not generated before it, past the first: as eos, it makes
    # that row finish early and the others (which never produce it before their end) run to the budget.
    generated = greedy.sequences[0, -10:].tolist()
    stop = next(k for k in range(1, 9) if generated[k] not in generated[:k])
    eos = generated[stop]
    greedy = generate(model, input_ids=prompts, config=GenerationConfig(max_new_tokens=10, eos_token_id=eos))
    one_beam = GenerationConfig(strategy="beam", max_new_tokens=10, num_beams=1, eos_token_id=eos)
    beam = generate(model, input_ids=prompts, config=one_beam)
    assert greedy.num_generated.tolist()[0] == stop + 1 and greedy.num_generated.max() == 10
    assert torch.equal(beam.sequences, greedy.sequences)
    torch.testing.assert_close(beam.scores, greedy.scores / greedy.num_generated)  # length penalty 1


def test_wider_beams_find_sequences_at_least_as_likely_as_greedy():
    model = _varied_model("decoder-only")
    prompts = _prompts()
    config = GenerationConfig(max_new_tokens=6, eos_token_id=96, length_penalty=0.0)  # score = sum log p
    greedy = generate(model, input_ids=prompts, config=config)
    beam = generate(model, input_ids=prompts, config=config.replace(strategy=DecodingStrategy.BEAM, num_beams=4))
    assert (beam.scores >= greedy.scores - 1e-5).all() and (beam.scores > greedy.scores + 1e-3).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_is_reproducible_and_respects_top_k(arch):
    model = _varied_model(arch)
    prompts = _prompts()
    config = GenerationConfig(strategy="sample", max_new_tokens=10, temperature=2.0, top_k=3, eos_token_id=96)
    draws = [
        generate(model, input_ids=prompts, config=config, generator=torch.Generator().manual_seed(seed))
        for seed in (7, 7, 8)
    ]
    assert torch.equal(draws[0].sequences, draws[1].sequences)
    assert not torch.equal(draws[0].sequences, draws[2].sequences)
    for out in draws:
        full = _full_forward_logits(model, prompts, out.sequences)
        top3 = full.topk(3, dim=-1).indices
        in_top3 = (top3 == out.sequences[:, -10:, None]).any(-1)
        assert in_top3[torch.arange(10) < out.num_generated[:, None]].all()  # each token among the 3 most likely
    greedy = generate(model, input_ids=prompts, config=GenerationConfig(max_new_tokens=10, eos_token_id=96))
    for narrow in (config.replace(top_k=1), config.replace(top_k=0, top_p=1e-6)):
        assert torch.equal(generate(model, input_ids=prompts, config=narrow).sequences, greedy.sequences)


def test_filter_logits_keeps_the_nucleus_and_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, GenerationConfig(**kw)))[0].tolist()  # noqa: E731
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(top_p=0.8) == [True, True, False, False]
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_k=3, top_p=0.6) == [True, True, False, False]


def test_decoder_only_left_padded_batch_continues_each_prompt_as_alone():
    model = _varied_model("decoder-only")
    long, short = _prompts(1, 7)[0], _prompts(1, 4, seed=2)[0]
    ids = torch.stack([long, torch.cat([torch.zeros(3, dtype=torch.long), short])])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    config = GenerationConfig(max_new_tokens=6, eos_token_id=96)
    together = generate(model, input_ids=ids, attention_mask=mask, config=config)
    alone = generate(model, input_ids=short[None], config=config)
    assert torch.equal(together.sequences[1, 3:], alone.sequences[0])
    torch.testing.assert_close(together.scores[1], alone.scores[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, input_ids=ids, attention_mask=mask.flip(1), config=config)


@pytest.mark.parametrize(
    ("field", "value"), [("max_new_tokens", 0), ("temperature", 0.0), ("top_p", 0.0), ("top_k", -1), ("num_beams", 0)]
)
def test_generation_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=f"GenerationConfig.{field}"):
        GenerationConfig(**{field: value})


def test_keyword_options_equal_an_explicit_config_and_unknown_ones_are_named():
    model = _varied_model("decoder-only")
    prompts = _prompts()
    explicit = generate(model, input_ids=prompts, config=GenerationConfig(max_new_tokens=5, strategy="beam"))
    keywords = model.generate(input_ids=prompts, max_new_tokens=5, strategy="beam")
    assert keywords.sequences.shape[1] == prompts.shape[1] + 5
    assert torch.equal(explicit.sequences, keywords.sequences)
    with pytest.raises(TypeError, match=r"max_tokens.*max_new_tokens"):
        model.generate(input_ids=prompts, max_tokens=5)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_a_finished_process_keeps_stepping_until_its_group_stops_without_changing_its_output(strategy):
    """``stop_together`` (expert-parallel ranks decode in lockstep): stepping on after the end changes nothing."""
    model = _varied_model("decoder-only")
    prompts, config = _prompt_ending_after(model, 3, strategy)
    alone = generate(model, input_ids=prompts, config=config)
    asked: list[bool] = []

    def peer_still_decoding(done: bool) -> bool:
        asked.append(done)
        return False  # another rank is never done before the token budget

    together = generate(model, input_ids=prompts, config=config, stop_together=peer_still_decoding)
    assert alone.num_generated.tolist() == together.num_generated.tolist() == [3]
    length = alone.sequences.shape[1]
    assert alone.sequences.shape[1] < together.sequences.shape[1] or strategy == "beam"
    assert torch.equal(together.sequences[:, :length], alone.sequences)
    assert (together.sequences[:, length:] == model.config.pad_token_id).all()
    torch.testing.assert_close(together.scores, alone.scores)
    assert len(asked) == 9 and asked[-1]  # asked at every step but the last, and this process was done

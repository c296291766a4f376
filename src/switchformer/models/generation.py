"""Autoregressive decoding with the KV cache: greedy, beam search and sampling, for both model types.

One new position per step goes through the decoder with the cache of the previous ones (``use_cache=True``);
the encoder of a :class:`SwitchTransformer` runs once. Greedy decoding reproduces ``transformers``'
``generate(do_sample=False)`` token for token on the same weights: sequences stop at ``eos`` and are padded with
``pad`` afterwards, and decoding stops once every sequence has finished.

Shape legend: B batch, K beams, N = B * K rows, V vocabulary, S prompt length.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable
from typing import Any

import torch

from switchformer.config import Config
from switchformer.layers.kv_cache import DecoderCache, StaticDecoderCache
from switchformer.models.base import SwitchModelBase
from switchformer.models.compiled_decoding import CompiledStep, compile_possible, compiled_step, decoding_forward
from switchformer.models.encoder_decoder import SwitchTransformer
from switchformer.models.prepacked import prepacked_decoder
from switchformer.models.stack import StackOutput

logger = logging.getLogger(__name__)


class DecodingStrategy(enum.Enum):
    GREEDY = "greedy"  # the most likely token each step
    BEAM = "beam"  # keep num_beams hypotheses, rank finished ones by length-penalised log-probability
    SAMPLE = "sample"  # draw from the (temperature, top-k, top-p filtered) distribution


@dataclasses.dataclass
class GenerationConfig(Config):
    strategy: DecodingStrategy = DecodingStrategy.GREEDY
    max_new_tokens: int = 32  # eos included
    num_beams: int = 4  # beam search only
    length_penalty: float = 1.0  # beam score = sum log p / generated_length ** length_penalty (> 0 favours long)
    temperature: float = 1.0  # sampling only; logits are divided by it
    top_k: int = 0  # sampling only; keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # sampling only; keep the smallest set of tokens holding this much probability (1 = all)
    seed: int = 0  # sampling without an explicit generator draws from torch.Generator().manual_seed(seed)
    eos_token_id: int | None = None  # None = the model config's
    pad_token_id: int | None = None  # None = the model config's
    # CPU: the decoder multiplies by copies of its weights packed for oneDNN, made once and kept with the model
    # (about the decoder's weight bytes more memory; models.prepacked). False decodes with the stored weights.
    prepack_weights: bool = True
    # Run each step after the first through a torch.compile'd step whose code holds the weights (frozen), with a
    # static KV cache (models.compiled_decoding): faster steps, after compiling once per model and set of shapes
    # (tens of seconds for a base-size model on CPU); each compilation holds up to about the decoder's weight bytes.
    compile: bool = False

    def validate(self) -> None:
        self.check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        self.check(self.num_beams >= 1, "num_beams", "must be >= 1")
        self.check(self.temperature > 0, "temperature", "must be > 0 (use strategy='greedy' for argmax decoding)")
        self.check(self.top_k >= 0, "top_k", "must be >= 0 (0 keeps every token)")
        self.check(0 < self.top_p <= 1, "top_p", "must be in (0, 1] (1 keeps every token)")


@dataclasses.dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, L] int64: decoder start token (encoder-decoder) or the prompt (decoder-only),
    # then the generated tokens; positions after a sequence's eos hold pad
    scores: torch.Tensor  # [B] float32 sum of the generated tokens' log-probabilities (beam: / length ** penalty)
    num_generated: torch.Tensor  # [B] int64 tokens generated per sequence, eos included


class _Decoder:
    """One decoding step of either model type over ``N`` rows, with the KV cache and the rows' bookkeeping."""

    def __init__(
        self,
        model: SwitchModelBase,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        rows: int,
        compiled: CompiledStep | None = None,
        max_new_tokens: int = 0,
    ) -> None:
        self.model = model
        self.cache: DecoderCache | None = None
        self.compiled, self.max_new_tokens = compiled, max_new_tokens  # the steps after the first, compiled
        index = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(rows)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self.mask = mask.index_select(0, index).long()
        if isinstance(model, SwitchTransformer):
            encoded = model.encode(input_ids, attention_mask)  # once per input, then copied for each beam
            self.memory: StackOutput | None = StackOutput(encoded.hidden_states.index_select(0, index), [], None)
            start = model.config.decoder_start_token_id
            self.prefix = torch.full((len(index), 1), start, dtype=torch.long, device=input_ids.device)
        else:
            if attention_mask is not None and not bool(attention_mask[:, -1].all()):
                raise ValueError("decoder-only prompts must be left-padded: attention_mask[:, -1] must be all ones")
            self.memory = None
            self.prefix = input_ids.index_select(0, index)

    def first(self) -> torch.Tensor:
        """Logits ``[N, V]`` for the first new token."""
        logits = self._run(self.prefix)
        if self.compiled is not None:  # the later steps' keys and values go to buffers of fixed shapes
            assert self.cache is not None
            self.cache = StaticDecoderCache.from_cache(self.cache, self.cache.length + self.max_new_tokens)
            if self.memory is None:  # the mask covers every position of the cache; the causal mask hides the future
                future = self.cache.capacity - self.mask.shape[1]
                self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], future)], 1)
        return logits

    def step(self, tokens_N: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; logits ``[N, V]`` for the next one."""
        if isinstance(self.cache, StaticDecoderCache):  # first() made it: the compiled step runs
            assert self.compiled is not None
            logits = self.compiled(self.model, tokens_N[:, None], self.mask, self.memory, self.cache)
            self.cache = self.cache.advanced()
            return logits
        if self.memory is None:  # decoder-only: the mask covers the cached positions and the new one
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        return self._run(tokens_N[:, None])

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        # self.mask: decoder-only, the positions' padding; encoder-decoder, the encoder's (for cross-attention)
        out = decoding_forward(self.model, ids, self.mask, self.memory, self.cache)
        self.cache = out.cache
        return out.logits[:, -1].float()

    def reorder(self, index_N: torch.Tensor) -> None:
        """Keep rows ``index_N`` (beam search: the surviving beams' caches)."""
        assert self.cache is not None
        # A beam only ever takes the place of a beam of the same input: the encoder output, the attention mask and
        # the cross-attention keys and values of each row, equal over an input's beams, stay where they are.
        self.cache = self.cache.reorder_beams(index_N)


@torch.no_grad()
def generate(
    model: SwitchModelBase,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    stop_together: Callable[[bool], bool] | None = None,
    **overrides: Any,
) -> GenerationOutput:
    """Decode continuations of ``input_ids`` (``[B, S]``; decoder-only prompts left-padded when batched).

    ``overrides`` set :class:`GenerationConfig` fields directly, as in ``generate(model, input_ids=ids,
    max_new_tokens=20, strategy="beam")``. Run the model in eval mode: in training mode dropout, router jitter and
    the training capacity factor apply. ``stop_together`` is for processes that must run the same forward passes
    (the ranks of an expert-parallel group, whose every step is an all-to-all among them): given whether this
    process's inputs are all finished, it returns whether every process's are; until then a finished process
    keeps stepping on padding, which changes none of its outputs.
    """
    config = config or GenerationConfig()
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(GenerationConfig)})
        if unknown:
            fields = ", ".join(f.name for f in dataclasses.fields(GenerationConfig))
            raise TypeError(f"generate() got unknown option(s) {unknown}; GenerationConfig fields: {fields}")
        config = config.replace(**overrides)
    if model.training:
        logger.warning("generate() on a model in training mode: dropout and router jitter are active")
    eos = config.eos_token_id if config.eos_token_id is not None else model.config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else model.config.pad_token_id
    if config.strategy is DecodingStrategy.SAMPLE and generator is None:
        generator = torch.Generator(device=input_ids.device).manual_seed(config.seed)
    compiled = None
    if config.compile:
        reason = compile_possible(model)
        if reason is not None:
            raise ValueError(f"generate(compile=True): {reason}, or pass compile=False")
        compiled = compiled_step(model)
    # The compiled step freezes the stored weights itself: its first step runs on them too.
    options: dict[str, Any] = {"eos": eos, "pad": pad, "stop_together": stop_together, "compiled": compiled}
    with prepacked_decoder(model, enabled=config.prepack_weights and compiled is None):
        if config.strategy is DecodingStrategy.BEAM:
            return _beam_search(model, input_ids, attention_mask, config, **options)
        return _greedy_or_sample(model, input_ids, attention_mask, config, generator=generator, **options)


def filter_logits(logits_NV: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus): removed tokens get ``-inf``."""
    logits_NV = logits_NV / config.temperature
    if 0 < config.top_k < logits_NV.shape[-1]:
        kth_N1 = torch.topk(logits_NV, config.top_k, dim=-1).values[:, -1:]
        logits_NV = logits_NV.masked_fill(logits_NV < kth_N1, float("-inf"))
    if config.top_p < 1:
        sorted_NV, order_NV = torch.sort(logits_NV, dim=-1, descending=True)
        probs_NV = sorted_NV.softmax(-1)
        before_NV = probs_NV.cumsum(-1) - probs_NV  # mass of the more likely tokens; the most likely is always kept
        remove_NV = torch.zeros_like(before_NV, dtype=torch.bool).scatter(1, order_NV, before_NV >= config.top_p)
        logits_NV = logits_NV.masked_fill(remove_NV, float("-inf"))
    return logits_NV


def _greedy_or_sample(
    model: SwitchModelBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    *,
    eos: int,
    pad: int,
    generator: torch.Generator | None,
    stop_together: Callable[[bool], bool] | None,
    compiled: CompiledStep | None = None,
) -> GenerationOutput:
    decoder = _Decoder(
        model, input_ids, attention_mask, rows=1, compiled=compiled, max_new_tokens=config.max_new_tokens
    )
    batch, device = input_ids.shape[0], input_ids.device
    finished_B = torch.zeros(batch, dtype=torch.bool, device=device)
    scores_B = torch.zeros(batch, dtype=torch.float32, device=device)
    tokens: list[torch.Tensor] = []
    logits_BV = decoder.first()
    for step in range(config.max_new_tokens):
        logprobs_BV = logits_BV.log_softmax(-1)
        if config.strategy is DecodingStrategy.SAMPLE:
            probs_BV = filter_logits(logits_BV, config).softmax(-1)
            next_B = torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)
        else:
            next_B = logits_BV.argmax(-1)
        next_B = torch.where(finished_B, pad, next_B)
        scores_B += torch.where(finished_B, 0.0, logprobs_BV.gather(1, next_B[:, None]).squeeze(1))
        tokens.append(next_B)
        finished_B = finished_B | (next_B == eos)
        if step == config.max_new_tokens - 1 or _all_stop(bool(finished_B.all()), stop_together):
            break
        logits_BV = decoder.step(next_B)
    generated = torch.stack(tokens, 1)
    num_generated = _lengths(generated, eos)
    return GenerationOutput(torch.cat([decoder.prefix, generated], 1), scores_B, num_generated)


def _all_stop(done: bool, stop_together: Callable[[bool], bool] | None) -> bool:
    return done if stop_together is None else stop_together(done)


def _lengths(generated_BL: torch.Tensor, eos: int) -> torch.Tensor:
    """Tokens up to and including the first eos (all of them when there is none)."""
    is_eos = generated_BL == eos
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, generated_BL.shape[1])
    return first.long()


@dataclasses.dataclass
class _Hypotheses:
    """The ``size`` best finished hypotheses of one input, as in ``transformers``' beam search."""

    size: int
    length_penalty: float
    items: list[tuple[float, list[int]]] = dataclasses.field(default_factory=list)

    def add(self, logprob: float, tokens: list[int]) -> None:
        score = logprob / len(tokens) ** self.length_penalty
        if len(self.items) < self.size or score > self.worst:
            self.items.append((score, tokens))
            self.items.sort(key=lambda item: -item[0])
            del self.items[self.size :]

    @property
    def worst(self) -> float:
        return self.items[-1][0] if self.items else float("-inf")

    def is_done(self, best_running_logprob: float, length: int) -> bool:
        """Full, and no running beam can beat the worst finished one at the current length."""
        full = len(self.items) == self.size
        return full and best_running_logprob / length**self.length_penalty <= self.worst


def _extend_beams(
    b: int,
    k: int,
    vocab: int,
    scores: list[float],
    indices: list[int],
    beams: list[list[int]],
    hyps: _Hypotheses,
    *,
    eos: int,
) -> list[tuple[int, int, float]]:
    """From input ``b``'s ``2k`` best candidates, finish those ending in eos and continue the ``k`` best others.

    Returns ``(row, token, score)`` for the next beams. ``2k`` candidates always hold ``k`` without eos, since
    each beam contributes at most one eos candidate.
    """
    chosen: list[tuple[int, int, float]] = []
    for rank, (score, index) in enumerate(zip(scores, indices, strict=True)):
        beam, token = divmod(index, vocab)
        if token == eos:
            if rank < k:  # an eos outside the top k is not better than the running beams
                hyps.add(score, [*beams[b * k + beam], token])
            continue
        chosen.append((b * k + beam, token, score))
        if len(chosen) == k:
            break
    return chosen


def _beam_search(
    model: SwitchModelBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    *,
    eos: int,
    pad: int,
    stop_together: Callable[[bool], bool] | None,
    compiled: CompiledStep | None = None,
) -> GenerationOutput:
    k, batch, device = config.num_beams, input_ids.shape[0], input_ids.device
    decoder = _Decoder(
        model, input_ids, attention_mask, rows=k, compiled=compiled, max_new_tokens=config.max_new_tokens
    )
    # Only beam 0 starts alive, so the first step does not pick the same token k times.
    scores_BK = torch.full((batch, k), -1e9, device=device)
    scores_BK[:, 0] = 0.0
    beams: list[list[int]] = [[] for _ in range(batch * k)]
    hyps = [_Hypotheses(k, config.length_penalty) for _ in range(batch)]
    done = [False] * batch
    logits_NV = decoder.first()
    for step in range(config.max_new_tokens):
        vocab = logits_NV.shape[-1]
        candidates_BC = (scores_BK.reshape(-1, 1) + logits_NV.log_softmax(-1)).view(batch, k * vocab)
        top_scores, top_index = torch.topk(candidates_BC, 2 * k, dim=-1)
        top_scores_l, top_index_l = top_scores.tolist(), top_index.tolist()
        rows, next_tokens, next_scores = [], [], []
        for b in range(batch):
            chosen: list[tuple[int, int, float]] = [(b * k, pad, -1e9)] * k  # finished input: dummy beams
            if not done[b]:
                chosen = _extend_beams(b, k, vocab, top_scores_l[b], top_index_l[b], beams, hyps[b], eos=eos)
                done[b] = hyps[b].is_done(max(score for _, _, score in chosen), step + 1)
            for row, token, score in chosen:
                rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
        beams = [[*beams[row], token] for row, token in zip(rows, next_tokens, strict=True)]
        scores_BK = torch.tensor(next_scores, device=device).view(batch, k)
        if step == config.max_new_tokens - 1 or _all_stop(all(done), stop_together):
            break
        decoder.reorder(torch.tensor(rows, device=device))
        logits_NV = decoder.step(torch.tensor(next_tokens, device=device))
    for b in range(batch):
        if not done[b]:
            for j in range(k):
                hyps[b].add(float(scores_BK[b, j]), beams[b * k + j])
    best = [h.items[0] for h in hyps]
    longest = max(len(tokens) for _, tokens in best)
    generated = torch.full((batch, longest), pad, dtype=torch.long, device=device)
    for b, (_, tokens) in enumerate(best):
        generated[b, : len(tokens)] = torch.tensor(tokens, device=device)
    prefix = decoder.prefix.view(batch, k, -1)[:, 0]
    scores = torch.tensor([score for score, _ in best], device=device)
    lengths = torch.tensor([len(tokens) for _, tokens in best], device=device)
    return GenerationOutput(torch.cat([prefix, generated], 1), scores, lengths)

"""Exact match: greedy outputs, decoded, compared with the targets after whitespace normalisation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from switchformer.data.tokenizer import SwitchTokenizer
from switchformer.finetune.batches import Example, prompt_batch
from switchformer.models.base import SwitchModelBase
from switchformer.models.generation import GenerationConfig, generate


def normalize_text(text: str) -> str:
    """Collapse runs of whitespace and trim, so tokenizer spacing does not decide a match."""
    return " ".join(text.split())


@dataclasses.dataclass
class ExactMatchResult:
    exact_match: float  # correct / total, in [0, 1]
    correct: int
    total: int
    predictions: list[str]  # decoded greedy outputs, in the order of the examples


@torch.no_grad()
def exact_match(
    model: SwitchModelBase,
    examples: Sequence[Example],
    tokenizer: SwitchTokenizer,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 128,
    device: torch.device | None = None,
    stop_together: Callable[[bool], bool] | None = None,
) -> ExactMatchResult:
    """Greedy-decode every example's input (in eval mode, so no dropout, jitter or training capacity) and count
    outputs equal to the target. ``stop_together``: see :func:`generate` (expert-parallel ranks)."""
    device = device or next(model.parameters()).device
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    architecture, pad, eos = model.config.architecture, model.config.pad_token_id, model.config.eos_token_id
    was_training = model.training
    model.eval()
    predictions: list[str] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = {k: v.to(device) for k, v in prompt_batch(chunk, architecture, pad).items()}
            out = generate(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], config=config,
                           stop_together=stop_together)  # fmt: skip
            # sequences hold the decoder start token (encoder-decoder) or the prompt (decoder-only) first
            first = 1 if model.config.is_encoder_decoder else batch["input_ids"].shape[1]
            for row, count in zip(out.sequences.tolist(), out.num_generated.tolist(), strict=True):
                tokens = row[first : first + count]
                if tokens and tokens[-1] == eos:
                    tokens = tokens[:-1]
                predictions.append(tokenizer.decode(tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    correct = sum(normalize_text(p) == normalize_text(e.target) for p, e in zip(predictions, examples, strict=True))
    return ExactMatchResult(correct / max(len(examples), 1), correct, len(examples), predictions)

"""Tokenised text-to-text examples, padded batches, and a deterministic, resumable shuffled batch source.

Encoder-decoder: the encoder reads ``input </s>``, the decoder is taught ``target </s>``. Decoder-only: the model
reads ``input </s> target </s>`` and only the target positions carry labels, so the loss is on the target alone
(``</s>`` marks where the prompt ends, at training and generation time alike). Padding has attention mask 0 and
label -100, so it counts in no loss and (by default) claims no expert slot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from switchformer.data.tokenizer import SwitchTokenizer
from switchformer.finetune.config import FinetuneConfig
from switchformer.finetune.rows import TextPair
from switchformer.labels import IGNORE_INDEX
from switchformer.models.config import Architecture

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Example:
    line: int  # where the row came from, for messages
    prompt_ids: tuple[int, ...]  # the input's tokens and eos: what the encoder (or the LM, as a prompt) reads
    target_ids: tuple[int, ...]  # the target's tokens and eos
    target: str  # the target text, compared with the decoded output for exact match


def _cut(ids: list[int], limit: int, eos: int) -> tuple[tuple[int, ...], bool]:
    """At most ``limit`` tokens ending with eos, and whether anything was cut."""
    return (*ids[: limit - 1], eos), len(ids) > limit - 1


def encode_pairs(pairs: Sequence[TextPair], tokenizer: SwitchTokenizer, config: FinetuneConfig) -> list[Example]:
    """Tokenise pairs, cutting inputs and targets to the configured lengths (a warning counts the cuts)."""
    eos = tokenizer.eos_id
    inputs = tokenizer.encode_batch([p.input for p in pairs])
    targets = tokenizer.encode_batch([p.target for p in pairs])
    examples, cut_inputs, cut_targets = [], 0, 0
    for pair, source, target in zip(pairs, inputs, targets, strict=True):
        prompt_ids, cut_in = _cut(source, config.max_input_length, eos)
        target_ids, cut_out = _cut(target, config.max_target_length, eos)
        cut_inputs += cut_in
        cut_targets += cut_out
        examples.append(Example(pair.line, prompt_ids, target_ids, pair.target))
    if cut_inputs or cut_targets:
        logger.warning(
            "cut %d of %d inputs to max_input_length=%d and %d targets to max_target_length=%d tokens",
            cut_inputs,
            len(pairs),
            config.max_input_length,
            cut_targets,
            config.max_target_length,
        )
    return examples


def _pad(rows: Sequence[Sequence[int]], value: int, *, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    padded = [[value] * (width - len(r)) + list(r) if left else list(r) + [value] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long)


def collate(examples: Sequence[Example], architecture: Architecture, pad_id: int) -> Batch:
    """A right-padded training/validation batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding)."""
    if architecture is Architecture.ENCODER_DECODER:
        input_ids = _pad([e.prompt_ids for e in examples], pad_id)
        mask = _pad([[1] * len(e.prompt_ids) for e in examples], 0)
        labels = _pad([e.target_ids for e in examples], IGNORE_INDEX)
    else:
        input_ids = _pad([e.prompt_ids + e.target_ids for e in examples], pad_id)
        mask = _pad([[1] * (len(e.prompt_ids) + len(e.target_ids)) for e in examples], 0)
        labels = _pad([(IGNORE_INDEX,) * len(e.prompt_ids) + e.target_ids for e in examples], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def prompt_batch(examples: Sequence[Example], architecture: Architecture, pad_id: int) -> Batch:
    """Generation inputs: right-padded for the encoder, left-padded prompts for a decoder-only model."""
    left = architecture is Architecture.DECODER_ONLY
    return {
        "input_ids": _pad([e.prompt_ids for e in examples], pad_id, left=left),
        "attention_mask": _pad([[1] * len(e.prompt_ids) for e in examples], 0, left=left),
    }


def validation_batches(
    examples: Sequence[Example], *, batch_size: int, architecture: Architecture, pad_id: int
) -> list[Batch]:
    """All examples in file order (the last batch may be smaller), so validation losses compare across steps."""
    return [
        collate(examples[start : start + batch_size], architecture, pad_id)
        for start in range(0, len(examples), batch_size)
    ]


def fingerprint(examples: Sequence[Example]) -> str:
    """A short hash of the tokenised data, stored in the source's state so that a state from other data is refused."""
    digest = hashlib.blake2b(digest_size=8)
    for e in examples:
        digest.update(np.asarray(e.prompt_ids, np.int64).tobytes() + b"|")
        digest.update(np.asarray(e.target_ids, np.int64).tobytes() + b"#")
    return digest.hexdigest()


class ShuffledBatches:
    """Endless full batches from epoch-wise permutations of the examples, seeded by ``(seed, epoch)``.

    The epochs are concatenated, so a batch may straddle two epochs and no example is ever dropped; the position
    is one integer (examples handed out), which makes :meth:`state_dict` tiny and resumption exact.
    """

    def __init__(
        self, examples: Sequence[Example], *, batch_size: int, architecture: Architecture, pad_id: int, seed: int
    ) -> None:
        if not examples:
            raise ValueError("ShuffledBatches needs at least one example")
        self.examples, self.batch_size, self.seed = list(examples), batch_size, seed
        self.architecture, self.pad_id = architecture, pad_id
        self.position = 0
        self._fingerprint = fingerprint(self.examples)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation), cached

    def __iter__(self) -> ShuffledBatches:
        return self

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
        return self._order[1]

    def __next__(self) -> Batch:
        picked = []
        for position in range(self.position, self.position + self.batch_size):
            epoch, index = divmod(position, len(self.examples))
            picked.append(self.examples[int(self._permutation(epoch)[index])])
        self.position += self.batch_size
        return collate(picked, self.architecture, self.pad_id)

    @property
    def epoch(self) -> float:
        """Epochs completed so far, fractional."""
        return self.position / len(self.examples)

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state saved for other data, seed or batch size."""
        expected = self.state_dict()
        for key in ("seed", "batch_size", "fingerprint"):
            if state.get(key) != expected[key]:
                raise ValueError(
                    f"cannot resume the fine-tuning data: saved {key}={state.get(key)!r} but this source has "
                    f"{key}={expected[key]!r}; resume with the files and settings the run started with"
                )
        self.position = int(state["position"])

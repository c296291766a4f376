"""A ``tokenizers.Tokenizer`` with T5's special-token layout: pad 0, eos ``</s>`` 1, unk 2, sentinels at the end.

T5 puts its span-corruption sentinels ``<extra_id_0>`` ... ``<extra_id_{n-1}>`` at the top of the vocabulary with
``<extra_id_0>`` the highest id, and uses the pad id as the decoder start token; the models here assume the same
(``pad_token_id=0``, ``eos_token_id=1``, ``decoder_start_token_id=0``). Trained tokenizers are byte-level (BPE or
Unigram over the 256 byte symbols), so every string round-trips exactly: ``decode(encode(text)) == text``.
Special tokens written in the text itself (``</s>`` in a docstring) are encoded as ordinary text, never as ids.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from switchformer.run_folder import atomic_write_text

logger = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2 in a trained tokenizer, as in T5
BYTE_ALPHABET_SIZE = 256
TOKENIZER_FILE = "tokenizer.json"


class TokenizerKind(enum.Enum):
    BPE = "bpe"  # byte-level BPE (GPT-2 style merges over bytes)
    # SentencePiece's algorithm (T5's vocabulary), here over bytes so nothing maps to unk. Its training in
    # `tokenizers` is parallel and not bit-reproducible: reruns reuse the cached tokenizer.json instead.
    UNIGRAM = "unigram"


class TokenizerNotFoundError(FileNotFoundError):
    """The named tokenizer is neither a local file nor loadable from the hub."""


def sentinel_token(index: int) -> str:
    return f"<extra_id_{index}>"


def min_vocab_size(num_sentinels: int) -> int:
    """The smallest trainable vocabulary: specials, the byte alphabet and the sentinels."""
    return len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE + num_sentinels


class SwitchTokenizer:
    """Encode/decode with T5's special ids. Wraps (and owns) one ``tokenizers.Tokenizer``.

    Missing ``<pad>``/``</s>`` tokens and sentinels of a loaded tokenizer are appended (with a warning when that
    moves pad/eos away from T5's ids 0/1, since the model config must then use :attr:`pad_id`/:attr:`eos_id`).
    """

    def __init__(self, tokenizer: Tokenizer, *, num_sentinels: int = 100) -> None:
        self._tokenizer = tokenizer
        tokenizer.encode_special_tokens = True  # text that spells "</s>" stays text (not serialised: set here)
        for token in (PAD, EOS):
            if tokenizer.token_to_id(token) is None:
                tokenizer.add_special_tokens([token])
                logger.warning("tokenizer had no %s token; appended it as id %d", token, tokenizer.token_to_id(token))
        present = 0
        while tokenizer.token_to_id(sentinel_token(present)) is not None:
            present += 1
        if present == 0 and num_sentinels > 0:
            # appended highest-index first so that <extra_id_0> gets the highest id, as in T5
            tokenizer.add_special_tokens([sentinel_token(i) for i in reversed(range(num_sentinels))])
            present = num_sentinels
        elif present != num_sentinels:
            logger.warning("tokenizer brings %d sentinels; using them instead of %d", present, num_sentinels)
        self._num_sentinels = present
        self._sentinel_ids = np.array([tokenizer.token_to_id(sentinel_token(i)) for i in range(present)], np.int64)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        documents: Iterable[str],
        *,
        kind: TokenizerKind = TokenizerKind.BPE,
        vocab_size: int = 8192,
        num_sentinels: int = 100,
    ) -> SwitchTokenizer:
        """Train on ``documents``; ``vocab_size`` counts everything (specials, sentinels). A small corpus may give
        fewer learned tokens, so read :attr:`vocab_size` afterwards rather than assuming the request."""
        if vocab_size < min_vocab_size(num_sentinels):
            raise ValueError(
                f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs at least "
                f"{min_vocab_size(num_sentinels)} (3 specials + 256 bytes + {num_sentinels} sentinels)"
            )
        learned = vocab_size - num_sentinels
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if kind is TokenizerKind.BPE:
            tokenizer = Tokenizer(models.BPE())
            trainer = trainers.BpeTrainer(
                vocab_size=learned, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet, show_progress=False
            )
        else:
            tokenizer = Tokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(
                vocab_size=learned,
                special_tokens=list(SPECIAL_TOKENS),
                unk_token=UNK,
                initial_alphabet=alphabet,
                show_progress=False,
            )
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.train_from_iterator(documents, trainer)
        return cls(tokenizer, num_sentinels=num_sentinels)

    @classmethod
    def load(cls, name_or_path: str | Path, *, num_sentinels: int = 100) -> SwitchTokenizer:
        """Load ``tokenizer.json``, a SentencePiece ``.model``, a folder holding either, or a hub name (online)."""
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            candidates = [path / TOKENIZER_FILE, path / "spiece.model", *sorted(path.glob("*.model"))]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise TokenizerNotFoundError(f"tokenizer folder {path} holds no {TOKENIZER_FILE} or *.model file")
            path = found
        if path.is_file():
            backend = _from_sentencepiece(path) if path.suffix == ".model" else Tokenizer.from_file(str(path))
            return cls(backend, num_sentinels=num_sentinels)
        name = str(name_or_path)
        if name.startswith(("/", ".", "~")) or path.suffix in (".json", ".model"):
            raise TokenizerNotFoundError(f"tokenizer file {path} does not exist; check the path or train one")
        try:
            backend = Tokenizer.from_pretrained(name)
        except Exception as error:  # network or unknown repository
            raise TokenizerNotFoundError(
                f"tokenizer {name!r} is not a local path and could not be loaded from the hub ({error})"
            ) from error
        return cls(backend, num_sentinels=num_sentinels)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (into ``path`` if it is a folder) atomically: temporary file, then rename."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, self._tokenizer.to_str())

    # -- encoding -------------------------------------------------------------------------------------
    def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [*ids, self.eos_id] if add_eos else ids

    def encode_batch(self, texts: Sequence[str], *, add_eos: bool = False) -> list[list[int]]:
        """Like :meth:`encode` for many texts at once (parallel inside ``tokenizers``)."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [[*e.ids, self.eos_id] if add_eos else e.ids for e in encodings]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- ids ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids including specials and sentinels (the model's vocab must be at least this)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._id(PAD)

    @property
    def eos_id(self) -> int:
        return self._id(EOS)

    @property
    def unk_id(self) -> int | None:
        return self._tokenizer.token_to_id(UNK)

    @property
    def num_sentinels(self) -> int:
        return self._num_sentinels

    @property
    def sentinel_ids(self) -> np.ndarray:
        """``sentinel_ids[i]`` is the id of ``<extra_id_i>`` (int64, a copy)."""
        return self._sentinel_ids.copy()

    def sentinel_id(self, index: int) -> int:
        if not 0 <= index < self._num_sentinels:
            raise IndexError(f"sentinel {index} out of range: this tokenizer has {self._num_sentinels} sentinels")
        return int(self._sentinel_ids[index])

    @property
    def backend(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (for batch encoding or inspection)."""
        return self._tokenizer

    def fingerprint(self) -> str:
        """A short hash of the full tokenizer definition, for cache keys."""
        return hashlib.sha256(self._tokenizer.to_str().encode()).hexdigest()[:16]

    def _id(self, token: str) -> int:
        value = self._tokenizer.token_to_id(token)
        assert value is not None, f"{token} is added in __init__"
        return value


def train_or_load_cached(
    folder: Path,
    documents: Iterable[str],
    *,
    kind: TokenizerKind = TokenizerKind.BPE,
    vocab_size: int = 8192,
    num_sentinels: int = 100,
) -> SwitchTokenizer:
    """Reuse ``folder/tokenizer.json`` when present (``documents`` is then never read), else train and save it.

    The folder should be keyed by the corpus and settings (the pipeline does so); a cached tokenizer whose size or
    sentinel count disagrees with the request is retrained rather than silently used.
    """
    path = folder / TOKENIZER_FILE
    if path.is_file():
        cached = SwitchTokenizer.load(path, num_sentinels=num_sentinels)
        if cached.vocab_size <= vocab_size and cached.num_sentinels == num_sentinels:
            logger.info("reusing tokenizer %s (%d ids)", path, cached.vocab_size)
            return cached
        logger.warning("cached tokenizer %s does not match the requested settings; retraining", path)
    tokenizer = SwitchTokenizer.train(documents, kind=kind, vocab_size=vocab_size, num_sentinels=num_sentinels)
    tokenizer.save(path)
    logger.info("trained a %s tokenizer with %d ids; saved %s", kind.value, tokenizer.vocab_size, path)
    return tokenizer


def _from_sentencepiece(path: Path) -> Tokenizer:
    """Convert a SentencePiece Unigram ``.model`` (T5's format) into an equivalent ``tokenizers.Tokenizer``."""
    from sentencepiece import sentencepiece_model_pb2  # ships with the sentencepiece package

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf's DecodeError, or an OSError
        raise ValueError(f"{path} is not a SentencePiece model: {error}") from error
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        raise ValueError(
            f"{path} is a SentencePiece model of another type than Unigram; convert it to tokenizer.json "
            "(e.g. with transformers.AutoTokenizer(...).backend_tokenizer.save) and load that"
        )
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    byte_fallback = proto.trainer_spec.byte_fallback
    tokenizer = Tokenizer(models.Unigram(vocab, proto.trainer_spec.unk_id, byte_fallback))
    steps = []
    if proto.normalizer_spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    if proto.normalizer_spec.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    if steps:
        tokenizer.normalizer = normalizers.Sequence(steps)
    scheme = "always" if proto.normalizer_spec.add_dummy_prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    metaspace = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), metaspace]) if byte_fallback else metaspace
    control = [p.piece for p in proto.pieces if p.type in (proto.SentencePiece.CONTROL, proto.SentencePiece.UNKNOWN)]
    tokenizer.add_special_tokens(control)  # already in the vocabulary: keeps their ids, marks them special
    return tokenizer

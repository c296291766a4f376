"""A corpus in memory: read with a size cap, long documents cut, and a deterministic train/validation split.

The split is by document, decided by a hash of the seed and the document's *text*: it does not depend on reading
order or on how many documents there are, duplicated documents always land on the same side (no leakage through
copies), and the same seed always gives the same split. Long documents (a single big text file, say) are first cut
at line boundaries so that even a one-file corpus has documents to split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

from switchformer.data.sources import CorpusError, DocumentSource, ReadStats

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Corpus:
    """The non-empty documents of a source, in source order, and what reading them found."""

    documents: list[str]
    stats: ReadStats
    description: str


@dataclasses.dataclass
class DocumentSplit:
    train: list[str]
    validation: list[str]


def read_corpus(source: DocumentSource, *, max_bytes: int | None = None) -> Corpus:
    """Read ``source`` until it ends or ``max_bytes`` UTF-8 bytes were read (the document crossing it is kept).

    Raises :class:`CorpusError` when nothing but empty documents was found, and warns (with the count) when
    undecodable bytes had to be replaced.
    """
    stats = ReadStats()
    documents: list[str] = []
    for document in source.documents(stats):
        if document:
            documents.append(document)
        if max_bytes is not None and stats.bytes >= max_bytes:
            logger.info("%s: stopped reading at the %d-byte cap", source.describe(), max_bytes)
            break
    if not documents:
        raise CorpusError(
            f"corpus {source.describe()} is empty ({stats.documents} documents, none with text); "
            "point the data source at files that contain text"
        )
    if stats.replaced_bytes:
        logger.warning(
            "%s: replaced %d undecodable bytes with U+FFFD (the files are not valid UTF-8)",
            source.describe(),
            stats.replaced_bytes,
        )
    return Corpus(documents, stats, source.describe())


def cut_long_documents(documents: list[str], max_chars: int) -> list[str]:
    """Cut documents longer than ``max_chars`` into pieces, at the last line break inside each piece when there is
    one; the pieces of a document concatenate back to it exactly."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    out: list[str] = []
    for document in documents:
        start = 0
        while len(document) - start > max_chars:
            end = document.rfind("\n", start, start + max_chars) + 1
            if end <= start:  # no line break in the window: one huge line, cut it where it is
                end = start + max_chars
            out.append(document[start:end])
            start = end
        out.append(document[start:])
    return out


def _unit_hash(seed: int, document: str) -> float:
    """A uniform number in [0, 1) from the seed and the document text."""
    digest = hashlib.blake2b(document.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_documents(documents: list[str], *, validation_fraction: float, seed: int) -> DocumentSplit:
    """Send each document to validation with probability ``validation_fraction`` (decided by its hash).

    With a positive fraction and at least two documents both sides get at least one document (the lowest or
    highest hash moves over), so a small corpus still has something to validate on.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if validation_fraction == 0:
        return DocumentSplit(list(documents), [])
    if len(documents) < 2:
        raise CorpusError(
            f"cannot split a corpus of {len(documents)} document(s) into training and validation; "
            "add more text or set validation_fraction=0"
        )
    hashes = [_unit_hash(seed, document) for document in documents]
    is_validation = [h < validation_fraction for h in hashes]
    if not any(is_validation):
        is_validation[min(range(len(hashes)), key=hashes.__getitem__)] = True
    if all(is_validation):
        is_validation[max(range(len(hashes)), key=hashes.__getitem__)] = False
    train = [d for d, v in zip(documents, is_validation, strict=True) if not v]
    validation = [d for d, v in zip(documents, is_validation, strict=True) if v]
    return DocumentSplit(train, validation)

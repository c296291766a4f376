"""Corpora as iterables of documents (``str``): text files, folders, JSON lines, Parquet, Hugging Face datasets.

Every source yields whole documents; packing, splitting and tokenising happen later and do not care where the text
came from. Reading never crashes on bad bytes: undecodable UTF-8 is replaced by U+FFFD and the number of replaced
bytes is counted in :class:`ReadStats`, so a run reports how dirty its data was instead of dying on byte 3,141,592.
Missing paths, empty corpora and unreadable files raise :class:`CorpusError` naming the path and what to do.

The built-in corpus is the running interpreter's own standard library: real text (code, docstrings, comments)
present on every machine that runs Python, so ``switchformer train`` needs no download.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset(
    {".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".java"}
    | {".js", ".ts", ".go", ".rs", ".rb", ".sh", ".html", ".xml", ".css", ".yaml", ".yml", ".toml", ".ini", ".cfg"}
)
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
PARQUET_SUFFIXES = frozenset({".parquet"})
# The standard library's own tests are left out of the built-in corpus: they hold deliberately malformed files
# (bad encodings, bad syntax) and would more than double its size for little new text.
BUILTIN_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
_REPLACEMENT = "\ufffd"
_REPLACEMENT_UTF8 = _REPLACEMENT.encode()


class CorpusError(ValueError):
    """The corpus cannot be used as given; the message names the path or dataset and what to do."""


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """The named corpus (file, folder or dataset) does not exist."""


@dataclasses.dataclass
class ReadStats:
    """What reading a corpus found; filled in while documents are yielded."""

    files: int = 0
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the yielded documents
    replaced_bytes: int = 0  # undecodable input bytes replaced by U+FFFD


class DocumentSource(Protocol):
    """Anything that yields documents and counts what it read."""

    def describe(self) -> str: ...

    def documents(self, stats: ReadStats) -> Iterator[str]: ...


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode ``raw`` as UTF-8, replacing bad bytes with U+FFFD; return the text and how many bytes were replaced.

    Counted in O(n) from the lengths: every valid character re-encodes to its own bytes and every replacement
    re-encodes to 3 bytes, so the replaced bytes are ``len(raw) - len(reencoded) + 3 * replacements``. A U+FFFD
    already present in ``raw`` (bytes EF BF BD, which always decode as one character) is not a replacement.
    """
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8", errors="replace")
    replacements = text.count(_REPLACEMENT) - raw.count(_REPLACEMENT_UTF8)
    return text, len(raw) - len(text.encode("utf-8")) + 3 * replacements


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise CorpusError(f"cannot read corpus file {path}: {error}; fix its permissions or remove it") from error


def _text_of(record: Any, field: str, where: str) -> str:
    """The text field of one record; ``None`` counts as an empty document (common in hub datasets)."""
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise CorpusError(f"{where} has no text field {field!r} (found {keys}); set text_field to the right name")
    value = record[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {field!r} holds {type(value).__name__}, not text; choose a text field")
    return value


def _count(stats: ReadStats, text: str) -> str:
    """Count one yielded document; lone surrogates (possible from JSON escapes) are replaced like bad bytes."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        before = text.count(_REPLACEMENT)
        text = text.encode("utf-16", errors="surrogatepass").decode("utf-16", errors="replace")
        stats.replaced_bytes += text.count(_REPLACEMENT) - before
        size = len(text.encode("utf-8"))
    stats.documents += 1
    stats.bytes += size
    return text


@dataclasses.dataclass(frozen=True)
class TextFiles:
    """Each file is one document (the natural unit for code and for folders of articles)."""

    paths: tuple[Path, ...]
    name: str = "text files"

    def describe(self) -> str:
        return self.name if len(self.paths) != 1 else str(self.paths[0])

    def documents(self, stats: ReadStats) -> Iterator[str]:
        for path in self.paths:
            text, replaced = decode_utf8(_read_bytes(path))
            stats.files += 1
            if replaced:
                stats.replaced_bytes += replaced
                logger.debug("%s: replaced %d undecodable bytes", path, replaced)
            yield _count(stats, text)


@dataclasses.dataclass(frozen=True)
class JsonLines:
    """One JSON object per line; ``text_field`` names the document's text. Blank lines are skipped."""

    path: Path
    text_field: str = "text"

    def describe(self) -> str:
        return str(self.path)

    def documents(self, stats: ReadStats) -> Iterator[str]:
        text, replaced = decode_utf8(_read_bytes(self.path))
        stats.files += 1
        stats.replaced_bytes += replaced
        # split on "\n" only: str.splitlines() would also break on U+2028 and friends inside JSON strings
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CorpusError(f"{self.path}:{number} is not valid JSON ({error}); fix or remove the line") from None
            yield _count(stats, _text_of(record, self.text_field, f"{self.path}:{number}"))


@dataclasses.dataclass(frozen=True)
class Parquet:
    """A Parquet file; ``text_field`` names the text column. Read in record batches to bound memory."""

    path: Path
    text_field: str = "text"

    def describe(self) -> str:
        return str(self.path)

    def documents(self, stats: ReadStats) -> Iterator[str]:
        import pyarrow.parquet as pq  # pyarrow comes with `datasets`; imported lazily to keep imports fast

        try:
            table = pq.ParquetFile(self.path)
        except Exception as error:  # pyarrow raises its own error types for corrupt files
            raise CorpusError(f"cannot read Parquet file {self.path}: {error}") from error
        if self.text_field not in table.schema_arrow.names:
            raise CorpusError(
                f"{self.path} has no column {self.text_field!r} (found {table.schema_arrow.names}); "
                "set text_field to the text column"
            )
        stats.files += 1
        for batch in table.iter_batches(columns=[self.text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                yield _count(stats, _text_of({self.text_field: value}, self.text_field, str(self.path)))


@dataclasses.dataclass(frozen=True)
class Folder:
    """All supported files under ``root``, recursively, in sorted path order; hidden entries are skipped."""

    root: Path
    text_field: str = "text"

    def describe(self) -> str:
        return str(self.root)

    def files(self) -> list[Path]:
        supported = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
        found = []
        for path in sorted(self.root.rglob("*")):
            relative = path.relative_to(self.root).parts
            if any(part.startswith(".") or part == "__pycache__" for part in relative):
                continue
            if path.is_file() and path.suffix.lower() in supported:
                found.append(path)
        return found

    def documents(self, stats: ReadStats) -> Iterator[str]:
        files = self.files()
        if not files:
            raise CorpusError(
                f"corpus folder {self.root} has no readable files; supported extensions: "
                f"{' '.join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES))}"
            )
        for path in files:
            yield from file_source(path, self.text_field).documents(stats)


@dataclasses.dataclass(frozen=True)
class HuggingFaceDataset:
    """A dataset through ``datasets.load_dataset``, streamed so large corpora need no full download first.

    ``name`` is a hub id (needs a network) or a packaged builder such as ``"json"``/``"parquet"`` with
    ``data_files`` (works offline; this is how the tests exercise the same code path).
    """

    name: str
    config_name: str | None = None
    split: str = "train"
    text_field: str = "text"
    data_files: tuple[str, ...] | None = None
    streaming: bool = True

    def describe(self) -> str:
        return f"dataset {self.name!r}" + (f" ({self.config_name})" if self.config_name else "")

    def documents(self, stats: ReadStats) -> Iterator[str]:
        import datasets  # heavy import, only needed for this source

        kwargs: dict[str, Any] = {"split": self.split, "streaming": self.streaming}
        if self.data_files is not None:
            kwargs["data_files"] = list(self.data_files)
        try:
            dataset = datasets.load_dataset(self.name, self.config_name, **kwargs)
        except Exception as error:  # network, missing dataset or split: report all the same way
            raise CorpusNotFoundError(
                f"cannot load {self.describe()} split {self.split!r}: {error}. If it is meant to be a local path, "
                "check that it exists; hub datasets need a network connection"
            ) from error
        for index, record in enumerate(dataset):
            yield _count(stats, _text_of(record, self.text_field, f"{self.describe()} record {index}"))


def file_source(path: Path, text_field: str = "text") -> DocumentSource:
    """The source for one file, chosen by its extension (unknown extensions are read as text)."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return JsonLines(path, text_field)
    if suffix in PARQUET_SUFFIXES:
        return Parquet(path, text_field)
    return TextFiles((path,))


def builtin_corpus() -> TextFiles:
    """The ``*.py`` files of the running interpreter's standard library, in sorted order (tests left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CorpusNotFoundError(f"the built-in corpus needs the standard library at {root}; name a corpus instead")
    paths = [
        path
        for path in sorted(root.rglob("*.py"))
        if not BUILTIN_SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1])
    ]
    return TextFiles(tuple(paths), name=f"built-in corpus (Python standard library at {root})")


def _looks_like_path(source: str) -> bool:
    suffix = Path(source).suffix.lower()
    known = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
    return source.startswith(("/", "./", "../", "~", "\\")) or suffix in known


def open_source(
    source: str | None,
    *,
    text_field: str = "text",
    dataset_config: str | None = None,
    dataset_split: str = "train",
) -> DocumentSource:
    """Resolve a corpus name: ``None`` = built-in, an existing path = file or folder, otherwise a hub dataset."""
    if source is None:
        return builtin_corpus()
    path = Path(source).expanduser()
    if path.is_dir():
        return Folder(path, text_field)
    if path.is_file():
        return file_source(path, text_field)
    if path.exists():
        raise CorpusError(f"corpus {path} is neither a file nor a folder")
    if _looks_like_path(source):
        raise CorpusNotFoundError(f"corpus {path} does not exist; check the path, or omit it for the built-in corpus")
    logger.info("%r is not a local file or folder: loading it as a Hugging Face dataset", source)
    return HuggingFaceDataset(source, dataset_config, dataset_split, text_field)

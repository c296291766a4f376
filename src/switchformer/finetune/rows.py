"""Read input/target pairs from JSON lines, reporting every bad row with its line number.

A row is bad when its line is not valid UTF-8 or JSON, is not an object, lacks a field, or holds a non-string or
empty (whitespace-only) text. Bad rows are never dropped silently: by default the file is refused with an error
listing them; with ``BadRowPolicy.SKIP`` they are left out and each one is logged. Blank lines hold no row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from switchformer.data.sources import CorpusNotFoundError
from switchformer.finetune.config import BadRowPolicy

logger = logging.getLogger(__name__)

MAX_DETAILED = 20  # bad rows explained one by one in an error; the others are listed by line number


@dataclasses.dataclass(frozen=True)
class TextPair:
    line: int  # 1-based line number in the file
    input: str
    target: str


@dataclasses.dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


@dataclasses.dataclass
class PairFile:
    path: Path
    pairs: list[TextPair]
    bad_rows: list[BadRow]  # empty unless the policy is SKIP (ERROR raises instead)


class BadRowsError(ValueError):
    """The file holds bad rows; the message lists each one's line number (and the first ones' reasons)."""

    def __init__(self, path: Path, bad_rows: list[BadRow]) -> None:
        self.path, self.bad_rows = path, bad_rows
        super().__init__(describe_bad_rows(path, bad_rows) + "; fix them, or pass --skip-bad-rows to leave them out")


def describe_bad_rows(path: Path, bad_rows: list[BadRow]) -> str:
    details = "; ".join(f"line {row.line}: {row.reason}" for row in bad_rows[:MAX_DETAILED])
    rest = bad_rows[MAX_DETAILED:]
    more = f"; {len(rest)} more at lines {', '.join(str(row.line) for row in rest)}" if rest else ""
    noun = "row" if len(bad_rows) == 1 else "rows"
    return f"{path}: {len(bad_rows)} bad {noun}: {details}{more}"


def _check_field(record: dict, field: str) -> tuple[str | None, str | None]:
    """``(text, None)`` for a usable field, ``(None, reason)`` otherwise."""
    if field not in record:
        return None, f"missing field {field!r}"
    value = record[field]
    if not isinstance(value, str):
        return None, f"field {field!r} is not a string (got {type(value).__name__})"
    if not value.strip():
        return None, f"field {field!r} is empty"
    return value, None


def parse_row(text: str, line: int, input_field: str, target_field: str) -> TextPair | BadRow:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        return BadRow(line, f"invalid JSON ({error.msg} at column {error.colno})")
    if not isinstance(record, dict):
        return BadRow(line, f"expected a JSON object, got {type(record).__name__}")
    source, source_problem = _check_field(record, input_field)
    target, target_problem = _check_field(record, target_field)
    problems = [p for p in (source_problem, target_problem) if p]
    if problems:
        return BadRow(line, "; ".join(problems))
    assert source is not None and target is not None
    return TextPair(line, source, target)


def read_pairs(
    path: str | Path,
    *,
    input_field: str = "input",
    target_field: str = "target",
    bad_rows: BadRowPolicy = BadRowPolicy.ERROR,
) -> PairFile:
    """All usable rows of the JSON-lines file ``path``; raises :class:`BadRowsError` (policy ERROR) or logs each
    bad row (policy SKIP). A file with no usable row is an error either way."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusNotFoundError(f"{path}: no such JSON-lines file") from None
    pairs: list[TextPair] = []
    bad: list[BadRow] = []
    # split on "\n" only: str.splitlines() would also break on U+2028 and friends inside JSON strings
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            bad.append(BadRow(number, f"not valid UTF-8 (byte {error.start})"))
            continue
        if not text.strip():
            continue
        row = parse_row(text, number, input_field, target_field)
        (pairs if isinstance(row, TextPair) else bad).append(row)
    if bad and bad_rows is BadRowPolicy.ERROR:
        raise BadRowsError(path, bad)
    for row in bad:
        logger.warning("%s:%d: skipping bad row: %s", path, row.line, row.reason)
    if not pairs:
        raise ValueError(f"{path}: no usable rows with string fields {input_field!r} and {target_field!r}")
    return PairFile(path, pairs, bad)

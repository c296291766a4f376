"""Bad JSON-lines rows are reported with their line numbers, never dropped silently."""

from __future__ import annotations

import logging

import pytest

from switchformer.finetune import BadRowPolicy, BadRowsError, read_pairs
from switchformer.finetune.rows import MAX_DETAILED
from tests.finetune.helpers import write_jsonl

GOOD = {"input": "a b", "target": "A B"}
MIXED = [
    GOOD,  # 1
    {"input": "a"},  # 2: missing target
    {"input": "b", "target": "   "},  # 3: empty (whitespace-only) target
    '{"input": "c", "target": ',  # 4: invalid JSON
    "",  # 5: blank, holds no row
    {"input": 7, "target": "C"},  # 6: non-string input
    '["a", "A"]',  # 7: not an object
    {"input": "", "target": ""},  # 8: both empty
    GOOD,  # 9
]


def test_error_lists_every_bad_row_with_its_line_and_reason(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", MIXED)
    with pytest.raises(BadRowsError) as caught:
        read_pairs(path)
    assert [(row.line, row.reason) for row in caught.value.bad_rows] == [
        (2, "missing field 'target'"),
        (3, "field 'target' is empty"),
        (4, "invalid JSON (Expecting value at column 26)"),
        (6, "field 'input' is not a string (got int)"),
        (7, "expected a JSON object, got list"),
        (8, "field 'input' is empty; field 'target' is empty"),
    ]
    message = str(caught.value)
    assert message.startswith(f"{path}: 6 bad rows: line 2: missing field 'target'; line 3:")
    assert "--skip-bad-rows" in message and isinstance(caught.value, ValueError)


def test_skip_keeps_the_good_rows_and_logs_each_bad_line(tmp_path, caplog):
    path = write_jsonl(tmp_path / "rows.jsonl", MIXED)
    with caplog.at_level(logging.WARNING, logger="switchformer.finetune.rows"):
        result = read_pairs(path, bad_rows=BadRowPolicy.SKIP)
    assert [(p.line, p.input, p.target) for p in result.pairs] == [(1, "a b", "A B"), (9, "a b", "A B")]
    assert [row.line for row in result.bad_rows] == [2, 3, 4, 6, 7, 8]
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 6 and logged[0] == f"{path}:2: skipping bad row: missing field 'target'"


def test_configurable_fields_invalid_utf8_and_long_lists(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"q": "x", "a": "y"}\n{"q": "\xff", "a": "y"}\n')
    with pytest.raises(BadRowsError, match=r"line 2: not valid UTF-8"):
        read_pairs(path, input_field="q", target_field="a")
    many = write_jsonl(tmp_path / "many.jsonl", [GOOD] + [{"input": "a"}] * (MAX_DETAILED + 3))
    with pytest.raises(BadRowsError) as caught:
        read_pairs(many)
    assert str(caught.value).count("missing field") == MAX_DETAILED
    assert f"3 more at lines {MAX_DETAILED + 2}, {MAX_DETAILED + 3}, {MAX_DETAILED + 4}" in str(caught.value)


def test_a_file_without_usable_rows_is_an_error_under_either_policy(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"question": "a", "answer": "A"}])
    with pytest.raises(ValueError, match="no usable rows"):
        read_pairs(path, bad_rows=BadRowPolicy.SKIP)
    with pytest.raises(ValueError, match="no such JSON-lines file"):  # so the CLI prints it without a traceback
        read_pairs(tmp_path / "absent.jsonl")

"""Every corpus format yields the same documents; bad bytes are counted; bad input gives errors naming the path."""

from __future__ import annotations

import json
import logging
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from switchformer.data import (
    CorpusError,
    CorpusNotFoundError,
    Folder,
    HuggingFaceDataset,
    JsonLines,
    Parquet,
    ReadStats,
    TextFiles,
    builtin_corpus,
    decode_utf8,
    open_source,
    read_corpus,
)

# U+2028 and U+0085 are line breaks to str.splitlines(), not to JSON lines
DOCUMENTS = ["first document\nwith two lines\n", "ünïcödé 日本 🙂\u2028still one document\x85", "def f():\n\tpass\n"]


def read_all(source) -> list[str]:
    return list(source.documents(ReadStats()))


@pytest.fixture
def corpus_files(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCUMENTS):  # doc0 and doc1 at the top, doc2 in a sub-folder: sorted path order
        (folder / ("sub" if i == 2 else "") / f"doc{i}.txt").write_bytes(doc.encode())
    (folder / ".hidden.txt").write_text("never read")
    (folder / "image.png").write_bytes(b"\x89PNG never read")
    jsonl = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"body": doc, "id": i}, ensure_ascii=False) for i, doc in enumerate(DOCUMENTS)]
    jsonl.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")  # a blank line is skipped
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(3)), "body": DOCUMENTS}), parquet)
    return {"folder": folder, "jsonl": jsonl, "parquet": parquet}


def test_all_formats_yield_the_same_documents(corpus_files):
    sources = [
        open_source(str(corpus_files["folder"])),
        open_source(str(corpus_files["jsonl"]), text_field="body"),
        open_source(str(corpus_files["parquet"]), text_field="body"),
        HuggingFaceDataset("json", text_field="body", data_files=(str(corpus_files["jsonl"]),)),
        HuggingFaceDataset("parquet", text_field="body", data_files=(str(corpus_files["parquet"]),)),
    ]
    assert isinstance(sources[0], Folder)
    assert isinstance(sources[1], JsonLines)
    assert isinstance(sources[2], Parquet)
    for source in sources:
        assert read_all(source) == DOCUMENTS, source.describe()


def test_a_single_text_file_is_one_document(corpus_files):
    source = open_source(str(corpus_files["folder"] / "doc1.txt"))
    assert isinstance(source, TextFiles)
    assert read_all(source) == [DOCUMENTS[1]]


def test_read_stats_count_files_documents_and_bytes(corpus_files):
    stats = ReadStats()
    list(open_source(str(corpus_files["folder"])).documents(stats))
    assert (stats.files, stats.documents, stats.replaced_bytes) == (3, 3, 0)
    assert stats.bytes == sum(len(d.encode()) for d in DOCUMENTS)


def test_decode_utf8_counts_replaced_bytes_exactly():
    assert decode_utf8("fine \ufffd already".encode()) == ("fine \ufffd already", 0)  # a real U+FFFD is not bad
    assert decode_utf8(b"a\xffb\xfe") == ("a\ufffdb\ufffd", 2)
    assert decode_utf8(b"x\xe2\x82y") == ("x\ufffdy", 2)  # a truncated 3-byte sequence: one character, 2 bytes
    assert decode_utf8(b"\xef\xbf\xbd\xc3") == ("\ufffd\ufffd", 1)


def test_undecodable_bytes_are_replaced_counted_and_logged(tmp_path, caplog):
    (tmp_path / "bad.txt").write_bytes(b"good text \xff\xfe and more \xe2\x82")
    (tmp_path / "good.txt").write_bytes(b"clean")
    with caplog.at_level(logging.WARNING):
        corpus = read_corpus(open_source(str(tmp_path)))
    assert corpus.documents == ["good text \ufffd\ufffd and more \ufffd", "clean"]
    assert corpus.stats.replaced_bytes == 4
    assert "replaced 4 undecodable bytes" in caplog.text


def test_lone_surrogates_from_json_escapes_are_replaced(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a\\ud800b"}\n')
    stats = ReadStats()
    assert list(JsonLines(path).documents(stats)) == ["a\ufffdb"]
    assert stats.replaced_bytes == 1


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_corpus.txt"
    with pytest.raises(CorpusNotFoundError, match=r"no_such_corpus\.txt") as error:
        open_source(str(missing))
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, ValueError)
    with pytest.raises(CorpusNotFoundError, match="does not exist"):
        open_source("./not/here")


def test_empty_file_and_empty_folder_errors_name_the_path(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CorpusError, match=r"empty\.txt.*is empty"):
        read_corpus(open_source(str(empty)))
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"\x00")
    with pytest.raises(CorpusError, match="nothing has no readable files"):
        read_corpus(open_source(str(folder)))


def test_unreadable_file_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("secret")
    original = Path.read_bytes

    def refuse(self):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(CorpusError, match=r"cannot read corpus file .*locked\.txt.*permissions"):
        read_corpus(open_source(str(tmp_path)))


def test_bad_records_name_file_line_and_field(tmp_path, corpus_files):
    with pytest.raises(CorpusError, match=r"corpus.jsonl:1 has no text field 'text' \(found \['body', 'id'\]\)"):
        read_all(JsonLines(corpus_files["jsonl"]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"broken\.jsonl:2 is not valid JSON"):
        read_all(JsonLines(broken))
    with pytest.raises(CorpusError, match="no column 'text'"):
        read_all(Parquet(corpus_files["parquet"]))
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": 3}\n')
    with pytest.raises(CorpusError, match="holds int, not text"):
        read_all(JsonLines(numbers))


def test_hub_dataset_failure_is_a_clear_error(tmp_path):
    source = HuggingFaceDataset("json", data_files=(str(tmp_path / "absent.jsonl"),))
    with pytest.raises(CorpusNotFoundError, match="cannot load dataset 'json'"):
        read_all(source)


def test_names_that_are_not_paths_become_hub_datasets():
    source = open_source("allenai/c4", dataset_config="en", dataset_split="validation", text_field="text")
    assert source == HuggingFaceDataset("allenai/c4", "en", "validation", "text")


def test_read_corpus_stops_at_the_byte_cap(corpus_files):
    corpus = read_corpus(open_source(str(corpus_files["folder"])), max_bytes=5)
    assert corpus.documents == DOCUMENTS[:1]  # the document crossing the cap is kept, the rest never read


def test_builtin_corpus_is_the_stdlib_sorted_and_deterministic():
    source = builtin_corpus()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert source.paths == tuple(sorted(source.paths))
    assert all(p.suffix == ".py" and stdlib in p.parents for p in source.paths)
    assert not any({"site-packages", "test"} & set(p.relative_to(stdlib).parts) for p in source.paths)
    assert stdlib / "os.py" in source.paths
    first = read_corpus(source, max_bytes=300_000)
    again = read_corpus(builtin_corpus(), max_bytes=300_000)
    assert first.documents == again.documents
    assert len(first.documents) > 10 and first.stats.bytes >= 300_000
    assert open_source(None) == source

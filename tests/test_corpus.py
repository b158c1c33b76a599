"""Tests for decapflow.bank.corpus: formats, cleaning, deduplication, error accounting, streaming memory."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from decapflow.bank.corpus import (
    MAX_LINES_KEPT,
    CorpusStats,
    Sentence,
    batched,
    clean_text,
    content_hash,
    detect_format,
    read_raw,
    read_sentences,
)

# Raw captions as they might arrive: messy whitespace, one duplicate after cleaning, one blank.
RAW = ["A dog runs.", "  a\tcat\u00a0sleeps ", "", "Ａ red bus", "A dog  runs.", "two\u200bwords", "last, with comma"]
CLEAN = ["A dog runs.", "a cat sleeps", "A red bus", "two words", "last, with comma"]


def write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path``, gzipped when the name ends in .gz."""
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def encode(fmt: str, texts: list[str], column: str = "caption") -> bytes:
    """Serialise ``texts`` in corpus format ``fmt`` (one record per text, in order)."""
    if fmt == "txt":
        return "".join(t + "\n" for t in texts).encode()
    if fmt == "jsonl":
        return "".join(json.dumps({"id": i, column: t}) + "\n" for i, t in enumerate(texts)).encode()
    if fmt in ("csv", "tsv"):
        out = io.StringIO()
        writer = csv.writer(out, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        writer.writerow(["id", column])
        writer.writerows([i, t] for i, t in enumerate(texts))
        return out.getvalue().encode()
    if fmt == "json":
        return json.dumps({"images": [], "annotations": [{"id": i, column: t} for i, t in enumerate(texts)]}).encode()
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(pa.table({"id": list(range(len(texts))), column: texts}), sink, row_group_size=3)
        return sink.getvalue()
    raise AssertionError(fmt)


def consume(path: Path, **kwargs) -> tuple[list[Sentence], CorpusStats]:
    stats = CorpusStats()
    sentences = list(read_sentences(path, stats=stats, **kwargs))
    assert stats.read == stats.accounted  # the counting identity, every time
    return sentences, stats


@pytest.mark.parametrize("gz", ["", ".gz"])
@pytest.mark.parametrize("suffix", ["txt", "jsonl", "csv", "tsv", "json", "parquet"])
def test_every_format_gives_the_same_sentences(tmp_path: Path, suffix: str, gz: str) -> None:
    path = write(tmp_path / f"corpus.{suffix}{gz}", encode(suffix, RAW))
    sentences, stats = consume(path)
    assert [s.text for s in sentences] == CLEAN
    assert [s.hash for s in sentences] == [content_hash(t) for t in CLEAN]
    assert {s.source for s in sentences} == {path.name}
    assert (stats.read, stats.empty, stats.duplicates, stats.yielded) == (7, 1, 1, 5)
    first_record = {"txt": 1, "jsonl": 1, "csv": 2, "tsv": 2, "json": 1, "parquet": 1}[suffix]  # csv: header=1
    assert [s.line for s in sentences] == [first_record + i for i in (0, 1, 3, 5, 6)]


def test_detect_format_and_errors(tmp_path: Path) -> None:
    assert detect_format(Path("a/b.JSONL.gz")) == "jsonl"
    assert detect_format("x.json") == "coco"
    assert detect_format("x.parquet.gz") == "parquet"
    for name in ("notes.md", "archive.gz", "noext"):
        with pytest.raises(ValueError, match=r"unknown corpus format.*\.jsonl.*\.parquet"):
            detect_format(Path(name))
    path = write(tmp_path / "corpus.txt", b"a\n")
    with pytest.raises(ValueError, match="supported: txt, jsonl"):
        read_raw(path, fmt="xml")
    with pytest.raises(ValueError, match="errors must be one of"):
        read_raw(path, errors="ignore")
    with pytest.raises(ValueError, match="does not apply to txt"):
        read_raw(path, field="caption")
    with pytest.raises(FileNotFoundError):
        read_raw(tmp_path / "missing.txt")


def test_format_override_and_gzip_detected_by_content(tmp_path: Path) -> None:
    path = write(tmp_path / "captions.dat", gzip.compress(encode("jsonl", ["hello there"])))  # gzip, no .gz
    assert [s.text for s in read_sentences(path, fmt="jsonl")] == ["hello there"]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a\u00a0b", "a b"),  # NBSP
        ("\ta \t\n b  ", "a b"),  # tabs, newline, runs
        ("Ｆｕｌｌ　ｗｉｄｔｈ１２", "Full width12"),  # full-width letters, digits and ideographic space
        ("zero\u200bwidth", "zero width"),  # zero-width space is a word break
        ("\ufeffBOM and soft\u00adhyphen and word\u2060joiner", "BOM and softhyphen and wordjoiner"),
        ("ﬁne caf\u0065\u0301", "fine café"),  # ligature, combining accent composed
        ("bell\x07 and\x00 nul", "bell and nul"),  # control characters dropped
        ("line\u2028sep\x85next", "line sep next"),
        ("Keep CASE", "Keep CASE"),
        (" \u200b\u00a0\t", ""),
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),
    ],
)
def test_clean_text(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean
    content_hash(clean_text(raw))  # always encodable


def test_content_hash_is_stable() -> None:
    assert content_hash("a cat") == "6eda1d6f0337894464a66e34f5d33507"  # pinned: stored banks depend on it
    assert content_hash("a cat") == content_hash("a cat") != content_hash("a Cat")
    assert all(c in "0123456789abcdef" for c in content_hash("x"))


def test_duplicates_after_normalisation_known_and_shared_seen(tmp_path: Path) -> None:
    first = write(tmp_path / "one.txt", "A cat\nA\u00a0cat\nＡ cat\n\tA cat \nA dog\nA bird\n".encode())
    second = write(tmp_path / "two.txt", b"A dog\nA fish\n")
    known = {content_hash("A bird")}
    seen: set[str] = set()
    sentences, stats = consume(first, known=known, seen=seen)
    assert [(s.text, s.line) for s in sentences] == [("A cat", 1), ("A dog", 5)]
    assert (stats.duplicates, stats.already_stored, stats.yielded) == (3, 1, 2)
    assert seen == {content_hash("A cat"), content_hash("A dog"), content_hash("A bird")}
    sentences, stats = consume(second, known=known, seen=seen)  # dedupe across files through `seen`
    assert [s.text for s in sentences] == ["A fish"] and stats.duplicates == 1


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "tsv", "json", "parquet"])
def test_field_selection_and_missing_field_error(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"c.{suffix}", encode(suffix, ["x y", "z"], column="alt_text"))
    assert [s.text for s in read_sentences(path, field="alt_text")] == ["x y", "z"]
    text_path = write(tmp_path / f"t.{suffix}", encode(suffix, ["from text"], column="text"))
    assert [s.text for s in read_sentences(text_path)] == ["from text"]  # default falls back to `text`
    with pytest.raises(ValueError, match=r"no .*'caption' or 'text'; available: \['alt_text', 'id'\]"):
        list(read_sentences(path))
    with pytest.raises(ValueError, match=r"'nope'; available"):
        list(read_sentences(path, field="nope"))


def test_coco_needs_annotations(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", json.dumps({"images": [], "info": {}}).encode())
    with pytest.raises(ValueError, match=r"'annotations' list; found \['images', 'info'\]"):
        list(read_sentences(path))
    path = write(tmp_path / "lines.json", b'{"caption": "a"}\n{"caption": "b"}\n')
    with pytest.raises(ValueError, match="fmt='jsonl'"):
        list(read_sentences(path))
    assert [s.text for s in read_sentences(path, fmt="jsonl")] == ["a", "b"]


def test_malformed_jsonl_lines_are_counted_not_fatal(tmp_path: Path) -> None:
    lines = [
        '{"caption": "good one"}',  # 1
        '{"caption": "broken',  # 2 not JSON
        '{"text": "fallback field"}',  # 3 ok
        '{"caption": 42}',  # 4 not a string
        '{"other": "x"}',  # 5 missing
        "[1, 2]",  # 6 not an object
        '"a bare string"',  # 7 ok: a JSON string is its own text
        "",  # 8 blank -> empty
        '{"caption": null, "text": "null caption"}',  # 9 ok: first field holding a string
        "{" * 100_000 + "}" * 100_000,  # 10 too deep: invalid, not a crash
    ]
    path = write(tmp_path / "c.jsonl", "\n".join(lines).encode())
    sentences, stats = consume(path)
    assert [(s.line, s.text) for s in sentences] == [
        (1, "good one"), (3, "fallback field"), (7, "a bare string"), (9, "null caption")]
    assert (stats.read, stats.invalid, stats.empty) == (10, 5, 1)
    assert stats.invalid_lines == [2, 4, 5, 6, 10]


def test_invalid_utf8_replace_and_skip(tmp_path: Path) -> None:
    data = b"fine\nbad \xff byte\nalso fine\ntrunc \xe2\x82\nend\n"
    path = write(tmp_path / "c.txt.gz", data)
    sentences, stats = consume(path)
    assert [s.text for s in sentences] == ["fine", "bad \ufffd byte", "also fine", "trunc \ufffd", "end"]
    assert (stats.invalid_utf8, stats.invalid_utf8_lines, stats.skipped) == (2, [2, 4], 0)
    sentences, stats = consume(path, errors="skip")
    assert [(s.line, s.text) for s in sentences] == [(1, "fine"), (3, "also fine"), (5, "end")]
    assert (stats.read, stats.skipped, stats.invalid_utf8_lines) == (5, 2, [2, 4])


def test_invalid_utf8_line_numbers_are_capped(tmp_path: Path) -> None:
    path = write(tmp_path / "c.txt", b"".join(b"x%d \xff\n" % i for i in range(50)))
    _, stats = consume(path, errors="skip")
    assert stats.invalid_utf8 == stats.skipped == 50 and stats.yielded == 0
    assert stats.invalid_utf8_lines == list(range(1, MAX_LINES_KEPT + 1))


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "json", "parquet"])
def test_invalid_utf8_in_structured_formats(tmp_path: Path, suffix: str) -> None:
    if suffix == "parquet":  # a binary column holding raw bytes
        sink = io.BytesIO()
        pq.write_table(pa.table({"caption": pa.array([b"ok", b"bad \xff", b"fine"], pa.binary())}), sink)
        data = sink.getvalue()
    else:
        data = encode(suffix, ["ok", "bad @", "fine"]).replace(b"@", b"\xff")
    path = write(tmp_path / f"c.{suffix}", data)
    sentences, _ = consume(path)
    assert [s.text for s in sentences] == ["ok", "bad \ufffd", "fine"]
    sentences, stats = consume(path, errors="skip")
    assert [s.text for s in sentences] == ["ok", "fine"] and stats.skipped == 1 and stats.invalid_utf8 == 1


@pytest.mark.parametrize("gz", ["", ".gz"])
def test_csv_quoted_multiline_field_keeps_line_numbers(tmp_path: Path, gz: str) -> None:
    data = b'\xef\xbb\xbfcaption,id\n"first,\nspans\n\nlines",1\nsecond,2\n"third ""quoted""",3\nshort\n\n'
    path = write(tmp_path / f"c.csv{gz}", data)
    sentences, stats = consume(path, field="caption")
    assert [(s.line, s.text) for s in sentences] == [
        (2, "first, spans lines"), (6, "second"), (7, 'third "quoted"'), (8, "short")]
    assert (stats.read, stats.empty) == (5, 1)  # the blank line 9 is an empty record
    path = write(tmp_path / "ids.csv", b'id,caption\n1,"a\nb"\n2\n3,c\n')
    sentences, stats = consume(path)
    assert [(s.line, s.text) for s in sentences] == [(2, "a b"), (5, "c")]
    assert stats.invalid_lines == [4]  # row too short for the caption column


def test_csv_runaway_quote_is_invalid_and_reading_recovers(tmp_path: Path) -> None:
    data = b'caption\nok\n"' + b"x" * 140_000 + b"\nafter\n"
    sentences, stats = consume(write(tmp_path / "c.csv", data))
    assert [(s.line, s.text) for s in sentences] == [(2, "ok"), (4, "after")]
    assert stats.invalid_lines == [3]


def test_count_identity_holds_while_streaming(tmp_path: Path) -> None:
    lines = [b'{"caption": "a"}', b'{"caption": "a"}', b"{bad", b'{"caption": "  "}', b'{"caption": "b \xff"}',
             b'{"caption": "stored"}', b'{"caption": "c"}'] * 3
    path = write(tmp_path / "c.jsonl", b"\n".join(lines))
    for errors in ("replace", "skip"):
        stats = CorpusStats()
        for _ in read_sentences(path, errors=errors, known={content_hash("stored")}, stats=stats):
            assert stats.read == stats.accounted  # also mid-stream, while the consumer holds a sentence
        assert stats.read == stats.accounted == 21
        assert stats.yielded == (2 if errors == "skip" else 3)
        assert (stats.invalid, stats.empty, stats.already_stored) == (3, 3, 1)  # later repeats: duplicates
        assert stats.to_dict()["skipped"] == (3 if errors == "skip" else 0)


def big_corpus(tmp_path: Path, lines: int = 200_000) -> tuple[Path, int]:
    """A gzipped txt corpus of ``lines`` lines (~40 bytes each) repeating 50 distinct sentences, so the only
    structure allowed to grow (the set of seen hashes) stays tiny. Returns the path and the text size."""
    path = tmp_path / "big.txt.gz"
    with gzip.open(path, "wt", compresslevel=1) as out:
        out.writelines(f"  sentence number {i % 50} with some padding text\n" for i in range(lines))
    return path, lines * 40


def traced_peak(consume_stream) -> int:
    """Peak bytes allocated by Python while ``consume_stream()`` runs."""
    tracemalloc.start()
    try:
        consume_stream()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_raw_stream_uses_constant_memory(tmp_path: Path) -> None:
    """Reading 200k lines (~8 MB) peaks far below the file size: no list of lines is built (~1 s traced)."""
    path, size = big_corpus(tmp_path)
    stats = CorpusStats()
    peak = traced_peak(lambda: sum(1 for _ in read_raw(path, stats=stats)))
    assert stats.read == 200_000
    assert peak < size / 20, f"peak {peak} bytes for a {size}-byte file"  # a list of lines would be > size


def test_sentence_stream_is_lazy(tmp_path: Path) -> None:
    """The cleaning/dedup layer pulls one record at a time: the first sentence costs one record read."""
    path, _ = big_corpus(tmp_path, lines=20_000)
    stats = CorpusStats()
    stream = read_sentences(path, stats=stats)
    assert next(stream).text == "sentence number 0 with some padding text"
    assert stats.read == 1
    assert sum(1 for _ in stream) == 49 and stats.read == 20_000 and stats.duplicates == 19_950


@pytest.mark.slow
def test_sentence_stream_uses_constant_memory(tmp_path: Path) -> None:
    """The full pipeline over 200k lines under tracemalloc (~5 s): peak far below the file size."""
    path, size = big_corpus(tmp_path)
    stats = CorpusStats()
    peak = traced_peak(lambda: sum(1 for _ in read_sentences(path, stats=stats)))
    assert stats.yielded == 50 and stats.read == 200_000 and stats.duplicates == 199_950
    assert peak < size / 20, f"peak {peak} bytes for a {size}-byte file"


def test_read_raw_is_lazy(tmp_path: Path) -> None:
    path = write(tmp_path / "c.txt", b"one\ntwo\nthree\n")
    stats = CorpusStats()
    stream = read_raw(path, stats=stats)
    assert stats.read == 0
    assert next(stream) == (1, "one\n") and stats.read == 1


def test_batched() -> None:
    assert list(batched(range(5), 2)) == [[0, 1], [2, 3], [4]]
    assert list(batched([], 3)) == []
    assert list(batched(iter("abc"), 3)) == [["a", "b", "c"]]
    with pytest.raises(ValueError, match=">= 1"):
        batched([1], 0)


def test_parquet_column_must_hold_text(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"caption": [1, 2], "text": ["a", None]}), path)
    with pytest.raises(ValueError, match="column 'caption' has type int64, not a string type"):
        list(read_sentences(path))
    sentences, stats = consume(path, field="text")
    assert [s.text for s in sentences] == ["a"] and stats.invalid_lines == [2]  # null is invalid

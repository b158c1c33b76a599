"""Read a text corpus as a stream of clean, deduplicated sentences: the first stage of ingest.

Formats, chosen from the suffix (``fmt=`` overrides); gzip is detected from the magic bytes, so ``x.txt.gz`` and
a gzipped file named ``x.txt`` both work. One record is: a line (``txt``: .txt); a line holding a JSON object or
string (``jsonl``: .jsonl .ndjson); a row after the header, quoted fields may span lines (``csv``/``tsv``); an
item of the top-level ``annotations`` list (``coco``: .json); a row (``parquet``).

Every format streams in constant memory except ``coco``, one JSON document read whole with ``json.loads``
(COCO caption files are tens of MB), and gzipped parquet, unpacked to a temporary file because parquet needs
seeking. The text field is ``field=`` if given, else the first of ``caption``, ``text`` holding a string. Each
record carries its 1-based number: the physical line where it starts (txt, jsonl, csv/tsv, where the header
is line 1), the annotation index (coco) or the row (parquet).

Counting identity, true at every point where a sentence is handed out and at the end of the stream::

    stats.read == empty + duplicates + already_stored + invalid + skipped + yielded   (== stats.accounted)

``invalid_utf8`` is diagnostic only: lines with bytes that are not UTF-8. With ``errors="replace"`` they are
kept with U+FFFD; with ``errors="skip"`` the records they belong to are dropped and counted in ``skipped``.

:func:`check_text` looks at the first MB of a file and raises :class:`CorpusError` when it is not text at all
(a binary file, an image, UTF-16...), so a caller can refuse it before creating anything.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import io
import itertools
import json
import shutil
import tempfile
from collections.abc import Callable, Container, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from decapflow.bank.sentences import MAX_LINES_KEPT, CorpusStats, Sentence, clean_text, content_hash  # noqa: F401

T = TypeVar("T")


class CorpusError(ValueError):
    """A corpus file that cannot be ingested as a whole (e.g. it is not text)."""


FORMATS = ("txt", "jsonl", "csv", "tsv", "coco", "parquet")
DEFAULT_FIELDS = ("caption", "text")
ERRORS = ("replace", "skip")
_SUFFIXES = {
    ".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
    ".json": "coco", ".parquet": "parquet",
}
_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"
_FIELD_PROBE = 100  # a jsonl/coco file whose first 100 objects all lack the field is misconfigured: raise

# --- low-level reading ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_bytes(path: Path, stats: CorpusStats | None = None) -> Iterator[IO[bytes]]:
    """Open ``path`` for binary reading, gunzipping on the fly when it starts with the gzip magic bytes; ``stats``
    follows the position in the file (:meth:`CorpusStats.fraction`)."""
    with open(path, "rb") as raw:
        if stats is not None:
            stats.follow(raw, Path(path).stat().st_size)
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        with gzip.GzipFile(fileobj=raw) if compressed else contextlib.nullcontext(raw) as binary:
            yield binary


def _decode_lines(binary: Iterable[bytes], stats: CorpusStats) -> Iterator[tuple[int, str, bool]]:
    """Yield ``(line_number, text, ok)`` per physical line (split on b"\\n" only, line ends kept).

    Each line is decoded strictly; a line that fails is counted, decoded with U+FFFD replacements and flagged
    ``ok=False``. A UTF-8 byte-order mark on line 1 is dropped."""
    for number, raw in enumerate(binary, start=1):
        if number == 1 and raw.startswith(_UTF8_BOM):
            raw = raw[len(_UTF8_BOM):]
        try:
            text, ok = raw.decode("utf-8"), True
        except UnicodeDecodeError:
            stats.record_invalid_utf8(number)
            text, ok = raw.decode("utf-8", "replace"), False
        yield number, text, ok


def _keep(ok: bool, skip: bool, stats: CorpusStats) -> bool:
    """Whether a record survives the UTF-8 policy; counts it as skipped when it does not."""
    if ok or not skip:
        return True
    stats.skipped += 1
    return False


def _pick(record: Any, fields: tuple[str, ...]) -> str | None:
    """The first of ``fields`` holding a string in a JSON object; a bare JSON string is its own text."""
    if isinstance(record, str) and fields == DEFAULT_FIELDS:
        return record
    if isinstance(record, dict):
        for name in fields:
            if isinstance(record.get(name), str):
                return record[name]
    return None


def _missing_field(path: Path, fields: tuple[str, ...], what: str, available: Iterable[str]) -> ValueError:
    wanted = " or ".join(repr(f) for f in fields)
    names = sorted(set(available))[:50]  # capped: a jsonl file may use many keys
    return ValueError(f"{path.name}: no {what} {wanted}; available: {names}. Pass field=...")


def _column(path: Path, names: list[str], fields: tuple[str, ...]) -> int:
    """Index of the first of ``fields`` among header ``names`` (compared stripped), else a ValueError."""
    stripped = [n.strip() for n in names]
    for name in fields:
        if name in stripped:
            return stripped.index(name)
    raise _missing_field(path, fields, "column", stripped)


# --- one reader per format: (path, fields, skip, stats) -> (record number, raw text) ------------------------


def _read_txt(path: Path, fields: tuple[str, ...], skip: bool, stats: CorpusStats) -> Iterator[tuple[int, str]]:
    with _open_bytes(path, stats) as binary:
        for number, text, ok in _decode_lines(binary, stats):
            stats.read += 1
            if _keep(ok, skip, stats):
                yield number, text


def _read_jsonl(path: Path, fields: tuple[str, ...], skip: bool, stats: CorpusStats) -> Iterator[tuple[int, str]]:
    """Bad JSON or a missing field is counted invalid; a file whose objects never hold the field raises."""
    misses, found, keys = 0, False, set()
    with _open_bytes(path, stats) as binary:
        for number, text, ok in _decode_lines(binary, stats):
            stats.read += 1
            if not _keep(ok, skip, stats):
                continue
            if not text.strip():
                yield number, ""  # a blank line: counted as empty downstream
                continue
            try:
                record = json.loads(text)
            except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
                stats.record_invalid(number)
                continue
            value = _pick(record, fields)
            if value is not None:
                found = True
                yield number, value
                continue
            stats.record_invalid(number)
            if not found and isinstance(record, dict):
                misses, keys = misses + 1, keys | set(record)
                if misses >= _FIELD_PROBE:
                    raise _missing_field(path, fields, "field", keys)
    if misses and not found:
        raise _missing_field(path, fields, "field", keys)


class _LineFeed:
    """Feeds decoded lines to ``csv.reader``, remembering the last line number and whether a line of the
    current record had invalid UTF-8 (csv.reader pulls exactly the lines of one row, no read-ahead)."""

    def __init__(self, lines: Iterator[tuple[int, str, bool]]):
        self._lines, self.number, self.bad = lines, 0, False

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        self.number, text, ok = next(self._lines)
        self.bad = self.bad or not ok
        return text


def _read_delimited(
    path: Path, fields: tuple[str, ...], skip: bool, stats: CorpusStats, *, delimiter: str
) -> Iterator[tuple[int, str]]:
    """CSV/TSV with a header row; quoted fields may hold newlines, the record number is its first line."""
    with _open_bytes(path, stats) as binary:
        feed = _LineFeed(_decode_lines(binary, stats))
        reader = csv.reader(feed, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        column = _column(path, header, fields)
        while True:
            start, feed.bad = feed.number + 1, False
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error:  # e.g. a runaway quote beyond csv.field_size_limit(); the reader recovers
                stats.read += 1
                stats.record_invalid(start)
                continue
            stats.read += 1
            if not _keep(not feed.bad, skip, stats):
                continue
            if not row:
                yield start, ""  # a blank line
            elif column < len(row):
                yield start, row[column]
            else:
                stats.record_invalid(start)


def _read_coco(path: Path, fields: tuple[str, ...], skip: bool, stats: CorpusStats) -> Iterator[tuple[int, str]]:
    """COCO captions JSON, read whole. Invalid UTF-8 is located per physical line and always replaced (a
    JSON document cannot lose a line); with skip, captions holding U+FFFD in such a file are dropped."""
    with _open_bytes(path, stats) as binary:
        decoded = list(_decode_lines(io.BytesIO(binary.read()), stats))
    damaged = not all(ok for _, _, ok in decoded)
    try:
        document = json.loads("".join(text for _, text, _ in decoded))
    except ValueError as exc:
        raise ValueError(f"{path.name}: not a JSON document ({exc}); one object per line needs fmt='jsonl'") from exc
    del decoded
    annotations = document.get("annotations") if isinstance(document, dict) else None
    if not isinstance(annotations, list):
        found = sorted(document) if isinstance(document, dict) else type(document).__name__
        raise ValueError(f"{path.name}: a COCO captions file needs a top-level 'annotations' list; found {found}")
    probe = [a for a in annotations[:_FIELD_PROBE] if isinstance(a, dict)]
    if probe and not any(_pick(a, fields) is not None for a in probe):
        raise _missing_field(path, fields, "annotation field", itertools.chain.from_iterable(probe))
    for number, annotation in enumerate(annotations, start=1):
        stats.read += 1
        value = _pick(annotation, fields)
        if value is None:
            stats.record_invalid(number)
        elif _keep(not (damaged and "\ufffd" in value), skip, stats):
            yield number, value


@contextlib.contextmanager
def _seekable(path: Path) -> Iterator[str | IO[bytes]]:
    """``path`` itself, or for a gzipped file an unpacked temporary copy (parquet readers need seeking)."""
    with open(path, "rb") as raw:
        if raw.read(2) != _GZIP_MAGIC:
            yield str(path)
            return
    with gzip.open(path, "rb") as unzipped, tempfile.TemporaryFile() as spill:
        shutil.copyfileobj(unzipped, spill)
        spill.seek(0)
        yield spill


def _read_parquet(path: Path, fields: tuple[str, ...], skip: bool, stats: CorpusStats) -> Iterator[tuple[int, str]]:
    """Parquet, one column read in record batches; nulls are invalid, binary columns are decoded as UTF-8."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _seekable(path) as source, pq.ParquetFile(source) as parquet:
        schema = parquet.schema_arrow
        name = schema.names[_column(path, schema.names, fields)]
        kind = schema.field(name).type
        textual = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
        if not any(check(kind) for check in textual):
            raise ValueError(f"{path.name}: column {name!r} has type {kind}, not a string type")
        number = 0
        for batch in parquet.iter_batches(batch_size=4096, columns=[name]):
            for value in batch.column(0).to_pylist():
                number += 1
                stats.read += 1
                ok = True
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        stats.record_invalid_utf8(number)
                        value, ok = value.decode("utf-8", "replace"), False
                if value is None:
                    stats.record_invalid(number)
                elif _keep(ok, skip, stats):
                    yield number, value


_Reader = Callable[[Path, tuple[str, ...], bool, CorpusStats], Iterator[tuple[int, str]]]
_READERS: dict[str, _Reader] = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "csv": functools.partial(_read_delimited, delimiter=","),
    "tsv": functools.partial(_read_delimited, delimiter="\t"),
    "coco": _read_coco,
    "parquet": _read_parquet,
}

# --- public API -----------------------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """The format named by the suffix, ignoring a trailing ``.gz``: ``data.jsonl.gz`` -> ``'jsonl'``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    fmt = _SUFFIXES.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        known = ", ".join(sorted(_SUFFIXES))
        raise ValueError(f"{Path(path).name}: unknown corpus format; supported suffixes: {known} (each optionally "
                         f"followed by .gz), or pass fmt= one of {', '.join(FORMATS)}")
    return fmt


def read_raw(
    path: str | Path, *, fmt: str | None = None, field: str | None = None, errors: str = "replace",
    stats: CorpusStats | None = None,
) -> Iterator[tuple[int, str]]:
    """Stream ``(record_number, raw_text)`` from a corpus file, uncleaned and undeduplicated.

    Counts ``read``, ``invalid``, ``skipped`` and ``invalid_utf8`` into ``stats``. Arguments are checked now;
    a missing column or field raises ValueError on the first ``next()``."""
    path = Path(path)
    if fmt is None:
        fmt = detect_format(path)
    if fmt not in _READERS:
        raise ValueError(f"unknown corpus format {fmt!r}; supported: {', '.join(FORMATS)}")
    if errors not in ERRORS:
        raise ValueError(f"errors must be one of {ERRORS}, got {errors!r}")
    if field is not None and fmt == "txt":
        raise ValueError("field= does not apply to txt corpora (one sentence per line)")
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    fields = (field,) if field is not None else DEFAULT_FIELDS
    return _READERS[fmt](path, fields, errors == "skip", stats if stats is not None else CorpusStats())


def read_sentences(
    path: str | Path, *, fmt: str | None = None, field: str | None = None, errors: str = "replace",
    known: Container[str] | None = None, seen: set[str] | None = None, stats: CorpusStats | None = None,
) -> Iterator[Sentence]:
    """Stream clean, deduplicated :class:`Sentence` objects from a corpus file.

    ``known``: hashes already stored (e.g. in the memory bank); the first occurrence of one is counted
    ``already_stored``, later ones ``duplicates`` (so already_stored counts distinct sentences).
    ``seen``: the set of hashes yielded so far, filled in place; pass one set to several calls to deduplicate
    across files (default: a fresh set, the only thing that grows with the corpus). ``stats``: filled as the
    stream is consumed. Other arguments as in :func:`read_raw`."""
    stats = stats if stats is not None else CorpusStats()
    raw = read_raw(path, fmt=fmt, field=field, errors=errors, stats=stats)
    return _sentences(raw, Path(path).name, known, seen if seen is not None else set(), stats)


def _sentences(
    raw: Iterator[tuple[int, str]], source: str, known: Container[str] | None, seen: set[str], stats: CorpusStats
) -> Iterator[Sentence]:
    for number, text in raw:
        text = clean_text(text)
        if not text:
            stats.empty += 1
            continue
        digest = content_hash(text)
        if digest in seen:
            stats.duplicates += 1
            continue
        seen.add(digest)
        if known is not None and digest in known:
            stats.already_stored += 1
        else:
            stats.yielded += 1  # before the yield, so the identity holds while the consumer holds the sentence
            yield Sentence(text=text, hash=digest, source=source, line=number)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of ``size`` consecutive items (the last may be shorter): ``batched(range(5), 2)`` -> [0,1] [2,3] [4]."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    iterator = iter(items)
    return iter(lambda: list(itertools.islice(iterator, size)), [])  # call until it returns [] (exhausted)

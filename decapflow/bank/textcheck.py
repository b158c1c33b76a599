"""Is a corpus file text at all? A cheap look at its first megabyte, before anything is written to a bank.

A 200 kB random binary file used to go in as 766 garbage sentences; :func:`check_text` refuses it (and UTF-16,
executables, images, compressed data, a column of numbers) with what it found, and lets through UTF-8 text with
a few damaged lines and Latin-1/cp1252 text.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import re
import zlib
from pathlib import Path

from decapflow.bank.corpus import _UTF8_BOM, CorpusError, _open_bytes, detect_format

__all__ = ["CorpusError", "check_text"]

SAMPLE_BYTES = 1 << 20  # check_text reads at most this much (decompressed) from the start of a file
MAX_BAD_SHARE = 0.10  # control characters + stray non-UTF-8 bytes; random bytes have ~32%, real text ~0-3%
MAX_LETTERLESS_SHARE = 0.8  # of the non-blank lines of a txt/jsonl/csv/tsv sample ...
MIN_LINES_JUDGED = 20  # ... judged only when the sample holds at least this many non-blank lines
# C0 controls except tab, newline, vertical tab, form feed and carriage return (all whitespace), plus DEL.
# They are ASCII bytes, never part of a UTF-8 multi-byte sequence, so counting them in the raw bytes is exact.
_CONTROL_BYTES = bytes(b for b in (*range(0x20), 0x7F) if b not in b"\t\n\v\f\r")
_STRAY = re.compile("[\udc80-\udcbf]")  # surrogateescape'd bytes 0x80-0xBF: no Latin-1 letter among them
_ESCAPED = re.compile("[\udc80-\udcff]")
_LETTER = re.compile(r"[^\W\d_]")
_TEXT_HINT = ("decapflow ingests UTF-8 text (.txt, .jsonl, .csv/.tsv, COCO .json, each optionally gzipped) "
              "or .parquet")


def check_text(path: str | Path, fmt: str | None = None, sample_bytes: int = SAMPLE_BYTES) -> None:
    """Raise :class:`CorpusError` unless the start of ``path`` looks like text; cheap (reads ``sample_bytes``).

    Parquet (``fmt`` or the suffix) is binary by design and not checked. Otherwise the first ``sample_bytes``,
    gunzipped when the file is gzip, are judged (a damaged gzip stream is refused too):

    * bytes: *bad* bytes are C0 control characters other than tab/newline/vt/ff/CR, DEL, and bytes that are
      not valid UTF-8 *and* lie in 0x80-0xBF. Undecodable bytes 0xC0-0xFF are let through because they are
      the accented letters of Latin-1/cp1252 text (``é`` = 0xE9), which is text read with U+FFFD replacements.
      The sample is refused when more than ``MAX_BAD_SHARE`` (10%) of it is bad: uniformly random bytes,
      compressed data and images score ~32%, executables (NUL runs) more, UTF-16 ~50%, GBK text ~25%; UTF-8
      text scores 0, a few damaged lines well under 1%, cp1252 text with curly quotes (0x92 ...) a few %.
    * lines, for txt/jsonl/csv/tsv: refused when at least ``MAX_LETTERLESS_SHARE`` (80%) of the non-blank
      lines hold no letter in any script (a column of numbers, punctuation...), judged only when the sample
      has at least ``MIN_LINES_JUDGED`` (20) of them. COCO JSON is exempt (pretty-printed JSON has many lines
      of brackets only).

    ``fmt`` is as in :func:`read_raw`; an unknown suffix is not an error here (reading raises it later), so a
    binary ``x.bin`` is refused as not text. Raises FileNotFoundError when ``path`` is not a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    if fmt is None:
        with contextlib.suppress(ValueError):
            fmt = detect_format(path)
    if fmt == "parquet":
        return
    with _open_bytes(path) as binary:
        try:
            sample = binary.read(sample_bytes + 1)  # one byte more tells whether the sample is the whole file
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise CorpusError(f"corpus {path.name} is a damaged or truncated gzip file ({exc})") from exc
    cut = len(sample) > sample_bytes
    sample = sample[:sample_bytes]
    if sample.startswith(_UTF8_BOM):
        sample = sample[len(_UTF8_BOM):]
    if not sample:
        return
    where = f"the first {_size(len(sample))}" if cut else f"its {_size(len(sample))}"
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    text = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(sample, final=not cut)
    stray = len(_STRAY.findall(text))
    if controls + stray > MAX_BAD_SHARE * len(sample):
        hint = ""
        if sample.startswith((b"\xff\xfe", b"\xfe\xff")):
            hint = " (it starts with a UTF-16 byte-order mark: convert it to UTF-8, e.g. iconv -f UTF-16 -t UTF-8)"
        elif sample.startswith(b"PAR1"):
            hint = " (it is a parquet file: pass fmt='parquet' / --format parquet)"
        elif controls < 0.01 * len(sample):
            hint = " (if it is text in another encoding, convert it to UTF-8 first, e.g. with iconv)"
        raise CorpusError(
            f"corpus {path.name} does not look like text{hint}: {(controls + stray) / len(sample):.0%} of {where} "
            f"is control characters ({controls / len(sample):.0%}) or bytes invalid as UTF-8 "
            f"({stray / len(sample):.0%}); {_TEXT_HINT}")
    if fmt not in ("txt", "jsonl", "csv", "tsv"):
        return
    lines = _ESCAPED.sub(lambda m: chr(ord(m.group()) - 0xDC00), text).split("\n")  # bad bytes as Latin-1
    if cut:
        lines.pop()  # the last line may be cut off mid-way
    lines = [line for line in lines if line.strip()]
    letterless = sum(1 for line in lines if not _LETTER.search(line))
    if len(lines) >= MIN_LINES_JUDGED and letterless >= MAX_LETTERLESS_SHARE * len(lines):
        raise CorpusError(
            f"corpus {path.name} does not look like text: {letterless} of the {len(lines)} non-blank lines in "
            f"{where} ({letterless / len(lines):.0%}) hold no letter; {_TEXT_HINT}")


def _size(n: int) -> str:
    """1536 -> '1.5 KB', 1048576 -> '1.0 MB'."""
    if n < 1024:
        return f"{n} bytes"
    return f"{n / 1024:.1f} KB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MB"

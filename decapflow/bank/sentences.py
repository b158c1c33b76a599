"""What a corpus becomes: clean text, its content hash, :class:`Sentence` records and the :class:`CorpusStats`
counters a read fills (``decapflow.bank.corpus`` reads the formats)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import IO, Any

MAX_LINES_KEPT = 20  # how many offending line numbers CorpusStats remembers per kind

# --- cleaning -----------------------------------------------------------------------------------------------

# Runs of Unicode whitespace (tabs, NBSP, ideographic space, U+2028, ...) plus the zero-width space (a word break
# that str.isspace() does not know) and the Mongolian vowel separator (whitespace before Unicode 6.3).
_SPACE_RUN = re.compile(r"[\s\u200b\u180e]+")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # lone surrogates, e.g. from a JSON "\ud800" escape
# Invisible characters that join rather than separate (soft hyphen, word joiner, BOM) and control characters
# that are not whitespace are deleted. ZWJ/ZWNJ stay: they carry meaning in emoji and several scripts.
_DROP = {cp: None for cp in (*range(0x20), *range(0x7F, 0xA0)) if not chr(cp).isspace()}
_DROP.update({0xAD: None, 0x2060: None, 0xFEFF: None})


def clean_text(text: str) -> str:
    """NFKC-normalise, drop invisible/control characters, collapse whitespace runs to one space, strip.

    Case is kept (CLIP's tokenizer lowercases anyway). Examples: ``"Ａ\\u00a0cat\\t sits"`` -> ``"A cat sits"``,
    ``"two\\u200bwords"`` -> ``"two words"``, ``"ﬁsh"`` -> ``"fish"``. Lone surrogates become U+FFFD so the
    result always encodes to UTF-8."""
    text = unicodedata.normalize("NFKC", _SURROGATE.sub("\ufffd", text)).translate(_DROP)
    return _SPACE_RUN.sub(" ", text).strip()


def content_hash(text: str) -> str:
    """A stable 32-hex-digit content hash of (already cleaned) text: BLAKE2b, 16-byte digest, over UTF-8."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


# --- records and counters -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sentence:
    """One clean sentence ready to embed."""

    text: str  # cleaned
    hash: str  # content_hash(text)
    source: str  # file name, not the full path
    line: int  # 1-based line (txt/jsonl/csv/tsv), annotation (coco) or row (parquet) number in the source


@dataclass
class CorpusStats:
    """Counters filled while streaming; share one object per file (line numbers do not name the file)."""

    read: int = 0  # every record, whatever became of it
    empty: int = 0  # nothing left after cleaning
    duplicates: int = 0  # hash already yielded in this stream (or in the caller's ``seen`` set)
    already_stored: int = 0  # hash in the caller's ``known`` container
    invalid: int = 0  # not valid JSON, field missing or not a string, csv row too short or unparsable
    skipped: int = 0  # dropped because of invalid UTF-8 (errors="skip" only)
    yielded: int = 0
    invalid_utf8: int = 0  # lines with invalid UTF-8 (diagnostic; not part of the identity)
    invalid_lines: list[int] = field(default_factory=list)  # first MAX_LINES_KEPT record numbers
    invalid_utf8_lines: list[int] = field(default_factory=list)  # first MAX_LINES_KEPT line numbers

    @property
    def accounted(self) -> int:
        """Sum of the outcomes; equals ``read`` (see the module docstring)."""
        return self.empty + self.duplicates + self.already_stored + self.invalid + self.skipped + self.yielded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def follow(self, raw: IO[bytes], size: int) -> None:
        """Report :meth:`fraction` from ``raw``'s position (not a field: the report stays plain data)."""
        self._raw, self._size = raw, size

    def fraction(self) -> float | None:
        """The share of the file read so far (of its compressed bytes for gzip; read ahead by a buffer), or None
        when unknown (parquet)."""
        raw = getattr(self, "_raw", None)
        if raw is None:
            return None
        try:
            return raw.tell() / self._size if self._size else 1.0
        except ValueError:  # closed: read to the end
            return 1.0

    def record_invalid(self, number: int) -> None:
        self.invalid += 1
        if len(self.invalid_lines) < MAX_LINES_KEPT:
            self.invalid_lines.append(number)

    def record_invalid_utf8(self, number: int) -> None:
        self.invalid_utf8 += 1
        if len(self.invalid_utf8_lines) < MAX_LINES_KEPT:
            self.invalid_utf8_lines.append(number)



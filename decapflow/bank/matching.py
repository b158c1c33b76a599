"""Which rows of a bank a removal means: sentences of a file, what an ingest brought, a regular expression, a
LanceDB filter, or everything. Criteria combine (all must hold); the answer is the matching rows' content hashes,
their count and a few sample sentences, read in one scan of the bank.

- ``file``: the file is read and cleaned exactly as ingest reads it (same formats, same cleaning, same content
  hash), so what was ingested from a file is removed with that file.
- ``source``: rows whose ``source`` (the file name an ingest or import recorded) is this name; with ``added_at``
  (the ingest's start time, as ``memory show`` and ``memory history`` print it) only that run's rows.
- ``pattern``: a regular expression searched in each sentence (RE2 syntax, as Arrow runs it: no look-around or
  back-references; ``(?i)`` for case-insensitive).
- ``where``: a LanceDB (SQL) filter over ``text``, ``source``, ``added_at``, ``hash`` (library and CLI only: a
  server never takes one), checked before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from decapflow.bank.corpus import read_sentences
from decapflow.bank.history import file_sha256
from decapflow.bank.memory import MemoryBank
from decapflow.bank.sentences import CorpusStats
from decapflow.errors import BankError

__all__ = ["Criteria", "Match", "match_rows"]

SCAN_ROWS = 65_536


@dataclass
class Criteria:
    """What to remove; at least one field set (``everything`` alone empties the bank)."""

    file: Path | None = None
    fmt: str | None = None  # the file's format (default: from its suffix, as ingest)
    field: str | None = None  # its text field (jsonl/csv), as ingest
    source: str | None = None
    added_at: str | None = None  # with ``source``: one ingest run's rows
    pattern: str | None = None
    where: str | None = None
    everything: bool = False

    def given(self) -> bool:
        return any(x is not None for x in (self.file, self.source, self.pattern, self.where)) or self.everything

    def describe(self, redact: bool = False) -> dict[str, Any]:
        """What the history records. ``redact``: leave out the pattern and filter (a purge erases the text they
        may quote)."""
        out: dict[str, Any] = {}
        if self.file is not None:
            out["file"] = Path(self.file).name
        if self.source is not None:
            out["source"] = self.source
        if self.added_at is not None:
            out["added_at"] = self.added_at
        if self.pattern is not None:
            out["match"] = "<redacted by purge>" if redact else self.pattern
        if self.where is not None:
            out["where"] = "<redacted by purge>" if redact else self.where
        if self.everything:
            out["all"] = True
        return out


@dataclass
class Match:
    hashes: list[str]
    sample: list[str] = field(default_factory=list)
    version: int = 0  # the bank version matched
    file_hash: str = ""  # SHA-256 of ``Criteria.file``
    file_sentences: int = 0  # distinct clean sentences in that file

    @property
    def count(self) -> int:
        return len(self.hashes)


def _file_hashes(criteria: Criteria) -> tuple[pa.Array, str, int]:
    path = Path(criteria.file)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    hashes = {s.hash for s in read_sentences(path, fmt=criteria.fmt, field=criteria.field, stats=CorpusStats())}
    return pa.array(sorted(hashes), pa.string()), file_sha256(path), len(hashes)


def _added_at(text: str) -> pa.Scalar:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BankError(f"--added-at {text!r} is not a time; copy it from 'decapflow memory show' "
                        f"(e.g. 2026-12-07T03:00:00+00:00)") from None
    return pa.scalar(when, pa.timestamp("us", tz="UTC"))


def match_rows(bank: MemoryBank, criteria: Criteria, sample: int = 5) -> Match:
    """The rows of ``bank`` (at its version) that meet every criterion given. Bad input (no criterion, a pattern
    or filter that does not parse, a missing file) raises before anything is read or written."""
    if not criteria.given():
        raise BankError("say which rows: a file of sentences, a source, a pattern, a filter, or all of them")
    if criteria.added_at is not None and criteria.source is None:
        raise BankError("--added-at narrows --source to one ingest run: give --source too")
    if criteria.pattern is not None:
        try:
            pc.match_substring_regex(pa.array([""]), criteria.pattern)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise BankError(f"pattern {criteria.pattern!r} does not parse (RE2 syntax): {error}") from None
    file_hashes, file_hash, file_sentences = (_file_hashes(criteria) if criteria.file is not None
                                              else (None, "", 0))
    when = _added_at(criteria.added_at) if criteria.added_at is not None else None
    query = bank.table.search().select(["hash", "text", "source", "added_at"]).limit(None)
    if criteria.where is not None:
        query = query.where(criteria.where)
    try:
        batches = query.to_batches(SCAN_ROWS)
        hashes: list[str] = []
        texts: list[str] = []
        for batch in batches:
            keep = pa.array([True] * batch.num_rows)
            if file_hashes is not None:
                keep = pc.and_(keep, pc.is_in(batch.column("hash"), value_set=file_hashes))
            if criteria.source is not None:
                keep = pc.and_(keep, pc.equal(batch.column("source"), criteria.source))
            if when is not None:
                keep = pc.and_(keep, pc.equal(batch.column("added_at"), when))
            if criteria.pattern is not None:
                keep = pc.and_(keep, pc.match_substring_regex(batch.column("text"), criteria.pattern))
            kept = batch.filter(pc.fill_null(keep, False))
            hashes += kept.column("hash").to_pylist()
            if len(texts) < sample:
                texts += kept.column("text").to_pylist()[: sample - len(texts)]
    except (ValueError, RuntimeError, OSError) as error:
        if criteria.where is None:
            raise
        raise BankError(f"filter {criteria.where!r} does not parse or names an unknown column (columns: hash, "
                        f"text, source, added_at): {error}") from None
    return Match(hashes, texts, bank.version, file_hash, file_sentences)

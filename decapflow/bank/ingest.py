"""Ingest: corpus file -> clean distinct sentences -> CLIP text embeddings -> memory bank, in committed chunks.

Three stages, each a plain function, so an orchestrator (``flows/ingest.py``) can run them as tasks:

    read_chunks (stream, dedupe, skip what the bank holds) -> embed_chunk (encoder) -> write_chunk (one commit)

``run_ingest`` drives them. A chunk is written in one LanceDB commit, so killing an ingest loses at most the chunk
in flight, and running the same command again embeds and writes only what is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from decapflow.bank import events, history
from decapflow.bank.corpus import CorpusStats, Sentence, batched, detect_format, read_sentences
from decapflow.bank.memory import MemoryBank, Registry, check_name
from decapflow.bank.refs import writable
from decapflow.bank.textcheck import check_text
from decapflow.encoders import DEFAULT_ENCODER, Encoder, load_encoder
from decapflow.progress import Pulse, duration

DEFAULT_CHUNK = 4096
MAX_REPASSES = 3  # passes again over the file when restores keep taking its rows out while it runs


@dataclass
class IngestReport:
    """What one ingest did. ``read`` = every record in the file; the rest say where each one went."""

    bank: str
    encoder: str
    source: str
    corpus: dict[str, Any] = field(default_factory=dict)
    truncated: int = 0
    written: int = 0
    concurrent: int = 0  # new when read, but stored by another writer before this one wrote them
    rewritten: int = 0  # written again after a restore (while this ran) took them out
    event: bool = False  # a decapflow.bank.updated event went to a Prefect server
    chunks: int = 0
    version: int = 0
    rows: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _problem_lines(self) -> str:
        """Where the bad records were (the first few line numbers of each kind)."""
        c = self.corpus
        return (_lines("invalid UTF-8", c.get("invalid_utf8_lines", []), c.get("invalid_utf8", 0))
                + _lines("invalid records", c.get("invalid_lines", []), c.get("invalid", 0)))

    def summary(self) -> str:
        c = self.corpus
        rate = self.written / self.seconds if self.seconds else 0.0  # includes loading the encoder
        return (
            f"bank {self.bank!r}: read {c.get('read', 0)}, empty {c.get('empty', 0)}, "
            f"duplicates {c.get('duplicates', 0)}, already stored {c.get('already_stored', 0)}, "
            f"invalid {c.get('invalid', 0)}, invalid UTF-8 {c.get('invalid_utf8', 0)}, "
            f"truncated {self.truncated}, written {self.written} in {self.seconds:.1f} s ({rate:,.0f} sentences/s)"
            + (f", {self.concurrent} stored meanwhile by another writer" if self.concurrent else "")
            + (f", {self.rewritten} written again after a restore took them out" if self.rewritten else "") + "; "
            f"bank now {self.rows} rows, version {self.version}"
            + self._problem_lines()
        )


def _lines(what: str, lines: list[int], total: int) -> str:
    more = " ..." if total > len(lines) else ""
    return f"\n  {what} at line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}{more}" if lines else ""


def bank_name_for(path: Path, memory: str | None) -> str:
    """The bank a corpus goes to: ``memory`` if given (a plain name: ``BANK@TAG`` / ``BANK@vN`` are read-only and
    refused), else the file's stem without format suffixes."""
    if memory:
        return writable(memory, "ingest")
    name = Path(path).name
    for suffix in (".gz", ".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet"):
        name = name.removesuffix(suffix)
    return check_name(name.replace(".", "-"))


def encoder_for(memory: str, encoder: str | None, store: str | None) -> str:
    """The encoder spec an ingest into ``memory`` uses: ``encoder``, else the existing bank's, else the default
    (without loading it: a remote embedder loads it where it runs)."""
    registry = Registry(store)
    return encoder or (registry.open(memory).encoder if registry.exists(memory) else DEFAULT_ENCODER)


def open_with_encoder(memory: str, encoder: str | None, store: str | None, device: str | None = None
              ) -> tuple[MemoryBank, Encoder]:
    """Open (or create) bank ``memory`` and load its encoder. An existing bank's own encoder is the default;
    naming another one is an error rather than a silently mixed bank."""
    registry = Registry(store)
    if registry.exists(memory):
        bank = registry.open(memory)
        bank.check_encoder(encoder or bank.encoder)  # before loading anything
        enc = load_encoder(bank.encoder, device)
        bank.check_encoder(enc.spec.raw, enc.dim)
        return bank, enc
    enc = load_encoder(encoder or DEFAULT_ENCODER, device)
    return registry.create(memory, enc.spec.raw, enc.dim, exist_ok=True), enc  # another ingest may create it too


def read_chunks(path: Path, known: set[str], stats: CorpusStats, chunk_size: int = DEFAULT_CHUNK,
                fmt: str | None = None, field: str | None = None, errors: str = "replace"
                ) -> Iterator[list[Sentence]]:
    """Stream the corpus as chunks of new, distinct sentences (``known`` hashes are skipped and counted)."""
    yield from batched(read_sentences(path, fmt=fmt, field=field, errors=errors, known=known, stats=stats), chunk_size)


def embed_chunk(encoder: Encoder, sentences: list[Sentence], batch_size: int = 256) -> tuple[np.ndarray, int]:
    """[n] sentences -> ([n, dim] unit float32 vectors, how many were cut to the encoder's context)."""
    ids, truncated = encoder.tokenize([s.text for s in sentences])
    return encoder.encode_tokens(ids, batch_size), truncated


def write_chunk(bank: MemoryBank, sentences: list[Sentence], vectors: np.ndarray, added_at: datetime,
                known_version: int | None = None, change: history.Change | None = None) -> int:
    """Append one chunk to the bank in a single commit, recorded in its history as part of ``change`` (one per
    ingest run; ``known_version``: see :meth:`MemoryBank.add`)."""
    return bank.add([s.hash for s in sentences], [s.text for s in sentences], vectors,
                    source=sentences[0].source if sentences else "", added_at=added_at, known_version=known_version,
                    change=change)


class RemoteEmbedder(Protocol):
    """Embeds chunks elsewhere (a Dask cluster, Prefect tasks on one): ``submit(texts)`` returns a future whose
    ``result()`` is ``([n, dim] vectors, truncated)``; ``window`` futures may be pending at once."""

    spec: str
    dim: int
    window: int

    def submit(self, texts: list[str]) -> Any: ...


def run_ingest(
    path: Path,
    memory: str | None = None,
    encoder: str | None = None,
    store: str | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    batch_size: int = 256,
    fmt: str | None = None,
    field: str | None = None,
    errors: str = "replace",
    device: str | None = None,
    progress: bool = False,
    embed: Callable[..., tuple[np.ndarray, int]] = embed_chunk,
    write: Callable[..., int] = write_chunk,
    workers: int | None = None,
    cluster: str | None = None,
    remote: RemoteEmbedder | None = None,
    pulse: Pulse | None = None,
) -> IngestReport:
    """Ingest ``path`` into bank ``memory``. ``embed``/``write`` may be replaced by orchestrated versions of
    :func:`embed_chunk` / :func:`write_chunk` (same signatures). With ``workers`` (a local Dask cluster) or
    ``cluster`` (a Dask scheduler address), or a ready ``remote`` embedder, chunks are embedded elsewhere and
    still written in order (:mod:`decapflow.bank.dask_embed`). ``pulse`` gets a line per committed chunk (records
    read, sentences written, rates, the bank's version, the share of the file read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {str(path)!r} does not exist")
    start = time.perf_counter()
    name = bank_name_for(path, memory)
    check_text(path, fmt)  # a binary file is refused before the bank is created or opened
    if fmt is None:
        detect_format(path)  # so is a file of unknown format
    if remote is None and (workers or cluster):
        from decapflow.bank.dask_embed import DaskEmbedder

        with DaskEmbedder(encoder_for(name, encoder, store), device, address=cluster, workers=workers, batch_size=batch_size) as dask:
            report = run_ingest(path, memory, encoder, store, chunk_size=chunk_size, batch_size=batch_size, fmt=fmt,
                                field=field, errors=errors, device=device, progress=progress, write=write, remote=dask,
                                pulse=pulse)
        report.seconds = time.perf_counter() - start  # with the cluster's start-up and close, like the local path
        return report
    if remote is None:
        bank, enc = open_with_encoder(name, encoder, store, device)

        def embedded(chunks: Iterator[list[Sentence]]) -> Iterator[tuple[list[Sentence], tuple[np.ndarray, int]]]:
            return ((chunk, embed(enc, chunk, batch_size)) for chunk in chunks)
    else:
        bank = Registry(store).create(name, remote.spec, remote.dim, exist_ok=True)
        bank.check_encoder(encoder or bank.encoder)

        def embedded(chunks: Iterator[list[Sentence]]) -> Iterator[tuple[list[Sentence], tuple[np.ndarray, int]]]:
            from decapflow.bank.dask_embed import ordered

            return ordered(chunks, lambda chunk: remote.submit([s.text for s in chunk]), remote.window)
    report = IngestReport(bank=name, encoder=bank.encoder, source=path.name)
    change = history.Change("ingest", source=path.name, content_hash=history.file_sha256(path))
    stats = CorpusStats()
    added_at = datetime.now(timezone.utc)
    began = history.utc_now()
    bar = _progress_bar(progress, name)
    if pulse is not None:
        pulse.say(f"ingesting {path.name} into bank {name!r} ({len(bank):,} rows, version {bank.version}) with "
                  f"encoder {bank.encoder}, chunks of {chunk_size:,}", 0.0)
    chunk_start = time.perf_counter()

    def one_pass(stats: CorpusStats) -> None:
        nonlocal chunk_start
        for chunk, (vectors, truncated) in embedded(read_chunks(path, bank.hashes(), stats, chunk_size, fmt, field,
                                                                errors)):
            written = write(bank, chunk, vectors, added_at, bank.known_version, change)  # only unseen hashes
            report.written += written
            report.concurrent += len(chunk) - written
            report.truncated += truncated
            report.chunks += 1
            if bar is not None:
                bar.update(len(chunk))
            if pulse is not None:
                now = time.perf_counter()
                pulse.say(f"chunk {report.chunks} committed: {stats.read:,} records read, {report.written:,} "
                          f"sentences written ({written / (now - chunk_start):,.0f}/s in this chunk, "
                          f"{report.written / (now - start):,.0f}/s overall, {duration(now - start)}), "
                          f"bank version {bank.version}", stats.fraction())
                chunk_start = now

    try:
        one_pass(stats)
        for _ in range(MAX_REPASSES):  # a restore while this ran took out chunks it had committed: write them again
            if not _restored_since(bank, began):
                break
            began, before = history.utc_now(), report.written
            if pulse is not None:
                pulse.say(f"bank {name!r} was restored while this ingest ran: writing again what it took out")
            one_pass(CorpusStats())
            report.rewritten += report.written - before
    finally:
        if bar is not None:
            bar.close()
    report.corpus = stats.to_dict()
    report.version, report.rows = bank.version, len(bank)
    report.seconds = time.perf_counter() - start
    if report.written:
        report.event = events.bank_updated(name, report.written, report.version, report.rows, path.name)
    return report


def _restored_since(bank: MemoryBank, began: str) -> bool:
    """Whether bank ``bank`` was restored (``memory restore``) after ``began`` (a history time)."""
    return bank.store is not None and any(
        row["op"] == "restore" and row["time"] >= began for row in history.rows(bank.store, bank.name))


def _progress_bar(enabled: bool, name: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc=f"ingest {name}", unit=" sentences", unit_scale=True, dynamic_ncols=True)

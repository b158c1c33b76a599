"""Bring your own embeddings: texts with precomputed CLIP text embeddings into a memory bank, no encoder run.

Two layouts are read, streamed in chunks:

* a **parquet** file (or a folder of them) with a text column (``caption``, then ``text``) and a vector column
  (``vector``, then ``embedding``): a list of floats per row;
* **clip-retrieval**'s output folder: ``text_emb/text_emb_<i>.npy`` (float16/float32 [n, d]) beside
  ``metadata/metadata_<i>.parquet`` (a ``caption`` column, same row order), shard by shard.

Texts are cleaned and deduplicated by content hash exactly like :mod:`decapflow.bank.ingest` (so importing and ingesting
the same sentences stores each once), vectors are checked against the bank's dimension and stored as float32 unit
vectors (rows that are not unit length are re-normalised and counted; zero or non-finite rows are refused and
counted). Writes go through :meth:`MemoryBank.add`: one commit per chunk, under the bank's lock, idempotent.
The encoder cannot be checked from the numbers alone: name the one that made them (``--encoder``); an existing
bank refuses any other.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from decapflow.bank import events, history
from decapflow.bank.corpus import clean_text, content_hash
from decapflow.bank.memory import MemoryBank, Registry
from decapflow.bank.refs import writable
from decapflow.errors import BankError

TEXT_FIELDS = ("caption", "text")
VECTOR_FIELDS = ("vector", "embedding")


@dataclass
class ImportReport:
    bank: str
    encoder: str
    source: str
    read: int = 0
    empty: int = 0
    duplicates: int = 0
    already_stored: int = 0
    invalid_vectors: int = 0
    normalised: int = 0
    written: int = 0
    concurrent: int = 0
    version: int = 0
    rows: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"bank {self.bank!r}: read {self.read}, empty {self.empty}, duplicates {self.duplicates}, already "
                f"stored {self.already_stored}, invalid vectors {self.invalid_vectors}, re-normalised "
                f"{self.normalised}, written {self.written} in {self.seconds:.1f} s; bank now {self.rows} rows, "
                f"version {self.version}")


def _pick(names: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, where: Path) -> str:
    for name in ([wanted] if wanted else defaults):
        if name in names:
            return name
    raise BankError(f"{where}: no {what} column {wanted or ' / '.join(defaults)!r} (columns: {', '.join(names)})")


def _parquet_batches(path: Path, text_field: str | None, vector_field: str | None, batch: int
                     ) -> Iterator[tuple[list[Any], np.ndarray]]:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    for file in files:
        reader = pq.ParquetFile(file)
        names = reader.schema_arrow.names
        text = _pick(names, text_field, TEXT_FIELDS, "text", file)
        vector = _pick(names, vector_field, VECTOR_FIELDS, "vector", file)
        for record in reader.iter_batches(batch_size=batch, columns=[text, vector]):
            column = record.column(vector)
            if not (pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type)
                    or pa.types.is_large_list(column.type)):
                raise BankError(f"{file}: column {vector!r} is {column.type}, not a list of floats")
            lengths = set(column.value_lengths().to_pylist()) if not pa.types.is_fixed_size_list(column.type) \
                else {column.type.list_size}
            if len(lengths) > 1:
                raise BankError(f"{file}: vectors of different lengths {sorted(lengths)[:5]}")
            flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            yield record.column(text).to_pylist(), flat.reshape(len(record), -1)


def _clip_retrieval_batches(path: Path, batch: int) -> Iterator[tuple[list[Any], np.ndarray]]:
    shards = sorted((path / "text_emb").glob("text_emb_*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not shards:
        raise BankError(f"{path}: no text_emb/text_emb_<i>.npy shards (clip-retrieval's --enable_text output)")
    for shard in shards:
        meta = path / "metadata" / f"metadata_{shard.stem.rsplit('_', 1)[1]}.parquet"
        if not meta.is_file():
            raise BankError(f"{shard}: its metadata file {meta} is missing")
        vectors = np.load(shard, mmap_mode="r")
        captions = pq.read_table(meta, columns=["caption"]).column("caption").to_pylist()
        if len(captions) != len(vectors):
            raise BankError(f"{shard}: {len(vectors)} embeddings but {len(captions)} captions in {meta.name}")
        for start in range(0, len(vectors), batch):
            yield captions[start : start + batch], np.asarray(vectors[start : start + batch], dtype=np.float32)


def read_embeddings(path: Path, text_field: str | None = None, vector_field: str | None = None,
                    batch: int = 4096) -> Iterator[tuple[list[Any], np.ndarray]]:
    """Batches of (texts, [n, d] float32 vectors) from a parquet file/folder or a clip-retrieval output folder."""
    path = Path(path)
    if path.is_dir() and (path / "text_emb").is_dir():
        return _clip_retrieval_batches(path, batch)
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        return _parquet_batches(path, text_field, vector_field, batch)
    raise BankError(f"{path}: not a .parquet file, a folder of them, or a clip-retrieval output folder")


def run_import(path: Path, memory: str, encoder: str | None = None, store: str | None = None, *,
               text_field: str | None = None, vector_field: str | None = None, chunk_size: int = 16_384,
               progress: bool = False) -> ImportReport:
    """Import ``path``'s texts and embeddings into bank ``memory`` (created with ``encoder`` when new)."""
    start = time.perf_counter()
    path = Path(path)
    name = writable(memory, "memory import")  # a plain name: BANK@TAG / BANK@vN are read-only
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    batches = read_embeddings(path, text_field, vector_field, chunk_size)
    registry = Registry(store)
    bank: MemoryBank | None = registry.open(name) if registry.exists(name) else None
    if bank is not None:
        bank.check_encoder(encoder or bank.encoder)
    elif not encoder:
        raise BankError(f"bank {name!r} is new: name the encoder that made these embeddings (--encoder)")
    report = ImportReport(bank=name, encoder=encoder or bank.encoder, source=path.name)
    known = bank.hashes() if bank is not None else set()
    seen: set[str] = set()
    added_at = datetime.now(timezone.utc)
    change = history.Change("import", source=report.source,
                            content_hash=history.file_sha256(path) if path.is_file() else "")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"import {name}", unit=" rows", unit_scale=True, dynamic_ncols=True)
    try:
        for texts, vectors in batches:
            if bank is None:  # created from the first batch's dimension (or by a concurrent import just now)
                bank = registry.create(name, encoder, vectors.shape[1], exist_ok=True)
                known = bank.hashes()
            report.written += _write(bank, texts, vectors, known, seen, report, added_at, change)
            if bar is not None:
                bar.update(len(texts))
    finally:
        if bar is not None:
            bar.close()
    if bank is not None:
        report.version, report.rows = bank.version, len(bank)
    report.seconds = time.perf_counter() - start
    if report.written:
        events.bank_updated(name, report.written, report.version, report.rows, path.name)
    return report


def _write(bank: MemoryBank, texts: list[Any], vectors: np.ndarray, known: set[str], seen: set[str],
           report: ImportReport, added_at: datetime, change: history.Change | None = None) -> int:
    """Clean, deduplicate (``known``: the bank's hashes; ``seen``: this import's), check and write one batch."""
    if vectors.shape[1] != bank.dim:
        raise BankError(f"bank {bank.name!r} holds {bank.dim}-d vectors ({bank.encoder}); these are "
                        f"{vectors.shape[1]}-d")
    report.read += len(texts)
    norms = np.linalg.norm(vectors, axis=1)
    keep_rows, hashes, kept_texts = [], [], []
    for i, raw in enumerate(texts):
        text = clean_text(raw) if isinstance(raw, str) else ""
        if not text:
            report.empty += 1
            continue
        if not np.isfinite(norms[i]) or norms[i] < 1e-6:
            report.invalid_vectors += 1
            continue
        digest = content_hash(text)
        if digest in known:
            report.already_stored += 1
            continue
        if digest in seen:
            report.duplicates += 1
            continue
        seen.add(digest)
        keep_rows.append(i)
        hashes.append(digest)
        kept_texts.append(text)
    if not keep_rows:
        return 0
    rows = vectors[keep_rows]
    off = np.abs(norms[keep_rows] - 1.0) > 1e-3
    report.normalised += int(off.sum())
    rows = rows / norms[keep_rows, None]
    written = bank.add(hashes, kept_texts, rows.astype(np.float32), source=report.source, added_at=added_at,
                       known_version=bank.known_version, change=change)
    report.concurrent += len(hashes) - written
    return written

"""Memory banks: named, versioned tables of sentences and their CLIP text embeddings in one LanceDB database.

One LanceDB table per bank, one row per distinct sentence:

    hash (content hash, the row's identity) | text | vector (float32[dim], unit) | source (file name) | added_at

Vectors are stored as float32: they are the decoder's training prefixes (kept exact), LanceDB's vector indexes
work on float32, and on CPUs half-precision arithmetic is 10-100x slower (measured), so a float16 copy would have
to be converted back on every use. The cost is 2 KB/row at 512 dimensions (1M sentences: 2 GB).

The encoder spec and vector size live in the table's schema metadata, so a bank refuses vectors of another encoder.
Each write is one LanceDB commit (a version): a killed ingest leaves whole chunks, and re-running it skips the
sentences already stored (by content hash). Writers take the bank's lock in the store (:meth:`Store.lock`) for each
chunk and insert only hashes the bank does not hold yet (a ``merge_insert`` on ``hash``), so concurrent ingests of
overlapping corpora end with each distinct sentence once. (LanceDB alone does not ensure that: two concurrent
insert-only merges of the same keys both commit, measured.)
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from decapflow.bank import history
from decapflow.bank.annindex import AnnIndex
from decapflow.bank.cache import PRECISIONS, VectorCache  # noqa: F401  (PRECISIONS: importable from here)
from decapflow.bank.ivf import LocalIvf
from decapflow.bank.refs import BankRef, checkout_version, latest_version
from decapflow.bank.rows import vector_rows
from decapflow.bank.store import Store, get_store
from decapflow.errors import BankError, UnknownBank, UnknownVersion

__all__ = ["BankError", "MemoryBank", "Registry", "SearchHit", "UnknownBank", "bank_schema", "check_name", "open_bank"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # names starting with '_' are the store's own tables
META_ENCODER = b"decapflow.encoder"
META_DIM = b"decapflow.dim"
META_ID = b"decapflow.bank_id"
META_CREATED = b"decapflow.created"


def check_name(name: str) -> str:
    """Bank names: 1-64 letters, digits, '-' or '_', starting with a letter or digit (they become table and
    folder names)."""
    if not _NAME.match(name or ""):
        raise BankError(f"invalid bank name {name!r}: use 1-64 letters, digits, '-' or '_', starting with a letter "
                        f"or digit")
    return name


def bank_schema(dim: int, encoder: str) -> pa.Schema:
    metadata = {
        META_ENCODER: encoder.encode(),
        META_DIM: str(dim).encode(),
        META_ID: uuid.uuid4().hex.encode(),
        META_CREATED: datetime.now(timezone.utc).isoformat(timespec="seconds").encode(),
    }
    return pa.schema(
        [
            pa.field("hash", pa.string(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("source", pa.string()),
            pa.field("added_at", pa.timestamp("us", tz="UTC")),
        ],
        metadata=metadata,
    )


@dataclass(frozen=True)
class SearchHit:
    text: str
    score: float  # cosine similarity
    row: int


class MemoryBank(VectorCache, AnnIndex, LocalIvf):
    """One bank: a LanceDB table plus what its metadata says (encoder spec, dimension).

    Opened as ``NAME`` it reads the newest version; as ``NAME@TAG`` or ``NAME@vN`` (:attr:`ref`) it is pinned to one
    version, read-only, and :meth:`refresh` follows the tag when it moves."""

    def __init__(self, name: str, table: Any, store: Store | None = None, ref: BankRef | None = None) -> None:
        self.name = name
        self.table = table
        self.store = store  # where the bank's write lock lives (None: an unlocked table, for tests)
        self.ref = ref or BankRef(name)  # what it was opened as
        meta = table.schema.metadata or {}
        if META_ENCODER not in meta:
            raise BankError(f"table {name!r} is not a decapflow memory bank (no encoder in its metadata)")
        self.encoder: str = meta[META_ENCODER].decode()
        self.dim: int = int(meta[META_DIM])
        self.bank_id: str = meta.get(META_ID, b"").decode()
        self.created: str = meta.get(META_CREATED, b"").decode()
        self.known_version: int | None = None  # see add()

    # ------------------------------------------------------------ reading
    @property
    def version(self) -> int:
        return int(self.table.version)

    @property
    def pinned(self) -> bool:
        """Whether this bank reads one version (opened as ``NAME@TAG``/``NAME@vN``, or by :meth:`at`)."""
        return self.ref.pinned

    def at(self, version: int | None = None) -> MemoryBank:
        """This bank pinned at ``version`` (default: the version a pinned reference names, else the newest now),
        read-only: later writes do not show, so a training run or a gate reads one consistent set of rows."""
        table = self.store.db.open_table(self.name) if self.store else self.table
        if version is None:
            version = self.version if self.pinned else latest_version(table)
        checkout_version(table, self.name, version)
        return MemoryBank(self.name, table, self.store, self.ref if self.ref.tag else BankRef(self.name, version=version))

    def refresh(self) -> bool:
        """Move to the version this bank's reference names now: the newest, or the one its tag pins (a tag moves);
        a fixed ``@vN`` stays. Returns whether the version changed (~1 ms locally)."""
        before = self.version
        if self.ref.tag is not None:
            checkout_version(self.table, self.name, self.tag_version(self.ref.tag))
        elif self.ref.version is None:
            self.table.checkout_latest()
        return self.version != before

    def tags(self) -> dict[str, int]:
        """Every tag of the bank and the version it pins (decapflow's own ``_clone-*`` pins included)."""
        return {name: int(info["version"]) for name, info in sorted(self.table.tags.list().items())}

    def tag_version(self, tag: str) -> int:
        """The version ``tag`` pins; :class:`UnknownVersion` (listing the tags) when there is no such tag."""
        tags = self.tags()
        if tag not in tags:
            shown = ", ".join(f"{t} (v{v})" for t, v in tags.items() if not t.startswith("_")) or "none"
            raise UnknownVersion(f"bank {self.name!r} has no tag {tag!r} (tags: {shown}); tag a version with: "
                                 f"decapflow memory tag {self.name} {tag} --version N")
        return tags[tag]

    def __len__(self) -> int:
        return int(self.table.count_rows())

    def hashes(self) -> set[str]:
        """Content hashes of every stored sentence (one column read: ~0.1 s per million rows). Sets
        :attr:`known_version` to the version read, for :meth:`add`."""
        version = self.version
        column = self.table.search().select(["hash"]).limit(None).to_arrow().column("hash")
        self.known_version = version
        return set(column.to_pylist())

    def check_encoder(self, encoder: str, dim: int | None = None) -> None:
        """Refuse vectors from another encoder than the one the bank was built with."""
        if encoder != self.encoder or (dim is not None and dim != self.dim):
            raise BankError(
                f"bank {self.name!r} holds embeddings of encoder {self.encoder!r} ({self.dim}-d); "
                f"got {encoder!r}{f' ({dim}-d)' if dim is not None else ''}. Use that encoder, or another bank"
            )

    def versions(self) -> list[dict[str, Any]]:
        """LanceDB versions of this bank: version number, time, and rows at that version."""
        return [
            {
                "version": int(v["version"]),
                "time": v["timestamp"].isoformat(timespec="seconds"),
                "rows": int(v["metadata"].get("total_rows", 0)),
            }
            for v in self.table.list_versions()
        ]

    def ingests(self) -> list[dict[str, Any]]:
        """One entry per ingest run (rows share its start time and source): when, from which file, how many."""
        cols = self.table.search().select(["source", "added_at"]).limit(None).to_arrow()
        if cols.num_rows == 0:
            return []
        grouped = cols.group_by(["added_at", "source"]).aggregate([([], "count_all")]).sort_by("added_at")
        return [
            {"time": row["added_at"].isoformat(timespec="seconds"), "source": row["source"], "rows": row["count_all"]}
            for row in grouped.to_pylist()
        ]

    def size_bytes(self) -> int | None:
        """Bytes on disk of the current version's data files (None when LanceDB does not say)."""
        last = self.table.list_versions()[-1]["metadata"]
        return int(last["total_files_size"]) if "total_files_size" in last else None

    def summary(self) -> dict[str, Any]:
        """One line's worth: name, rows, encoder, dim, version (``memory list``)."""
        return {"name": self.name, "rows": len(self), "encoder": self.encoder, "dim": self.dim,
                "version": self.version}

    def describe(self) -> dict[str, Any]:
        """What ``memory show`` prints: rows, encoder, size, the versions kept (each with the change that made it,
        from the history), the tags and the ingests."""
        versions = self.versions()
        if self.store is not None:
            made = {}
            for row in history.rows(self.store, self.name):
                if row["op"] != "tag":
                    made[row["version"]] = {"op": row["op"], "source": row["source"]}
            for v in versions:
                v["change"] = made.get(v["version"])
        return {
            "name": self.name,
            "rows": len(self),
            "encoder": self.encoder,
            "dim": self.dim,
            "version": self.version,
            "size_bytes": self.size_bytes(),
            "created": self.created,
            "updated": versions[-1]["time"] if versions else self.created,
            "versions": versions,
            "tags": self.tags(),
            "ingests": self.ingests(),
        }

    def arrays(self) -> tuple[list[str], np.ndarray]:
        """All texts and their [N, dim] float32 vectors at the current version, in row order."""
        table = self.table.search().select(["text", "vector"]).limit(None).to_arrow()
        return table.column("text").to_pylist(), vector_rows(table.column("vector"), self.dim)

    def search(self, query: np.ndarray, k: int = 10) -> list[SearchHit]:
        """The k stored sentences nearest (cosine) to a unit query vector [dim]."""
        vectors, texts = self.vector_cache()
        if len(vectors) == 0:
            return []
        scores = np.asarray(vectors @ query.astype(np.float32))
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top])]
        return [SearchHit(texts[int(i)].as_py(), float(scores[i]), int(i)) for i in top]

    # ------------------------------------------------------------ writing
    def add(self, hashes: Sequence[str], texts: Sequence[str], vectors: np.ndarray, source: str,
            added_at: datetime, known_version: int | None = None, change: history.Change | None = None) -> int:
        """Add the rows whose hash the bank does not hold yet, in one commit (one LanceDB version), under the
        bank's write lock, and record the commit in the bank's history as part of ``change`` (default: an ingest
        of ``source``). Returns rows written.

        ``known_version``: the caller has already dropped every hash the bank held at that version (and repeats
        within the batch). If no one has written since, the rows are appended without joining on ``hash`` (the
        join scans every stored hash: 5x an append at 200k rows, growing with the bank). After the call,
        :attr:`known_version` is the version the caller may pass next time (None when another writer's rows came
        in between, which the caller has not seen)."""
        if self.pinned:
            raise BankError(f"bank {str(self.ref)!r} is pinned to version {self.version} (read-only); write to "
                            f"{self.name!r}")
        if len(hashes) == 0:
            return 0
        if vectors.shape != (len(hashes), self.dim):
            raise BankError(f"expected vectors of shape ({len(hashes)}, {self.dim}), got {vectors.shape}")
        # A fresh, aligned copy when needed: vectors unpickled from a Dask worker can sit unaligned in their buffer,
        # which Arrow-rs refuses (a panic in LanceDB).
        flat = pa.array(np.require(vectors, np.float32, ["C_CONTIGUOUS", "ALIGNED"]).reshape(-1))
        batch = pa.table(
            {
                "hash": pa.array(hashes, pa.string()),
                "text": pa.array(texts, pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(flat, self.dim),
                "source": pa.array([source] * len(hashes), pa.string()),
                "added_at": pa.array([added_at] * len(hashes), pa.timestamp("us", tz="UTC")),
            },
            schema=self.table.schema,
        )
        self.known_version = None
        if self.store is None:
            self.table.add(batch)
            return len(hashes)
        with self.store.lock(f"bank-{self.name}") as lease:
            fresh = self.store.db.open_table(self.name)  # the join must see what other writers committed
            lease.check()  # a writer that stalled past its lease and lost it must not commit
            if known_version is not None and int(fresh.version) == known_version:
                fresh.add(batch)
                written = len(hashes)
                self.known_version = int(fresh.version)
            else:
                written = int(fresh.merge_insert("hash").when_not_matched_insert_all().execute(batch).num_inserted_rows)
            if written:
                history.record(self.store, self.name, change or history.Change("ingest", source=source),
                               version=int(fresh.version), rows=int(fresh.count_rows()), added=written)
        self.table.checkout_latest()
        return written

    def export(self, path: Path) -> int:
        """Write text, hash, source (and vectors for .parquet) to ``.jsonl``, ``.txt`` or ``.parquet``."""
        path = Path(path)
        columns = ["hash", "text", "source", "added_at"] + (["vector"] if path.suffix == ".parquet" else [])
        table = self.table.search().select(columns).limit(None).to_arrow()
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, path)
        elif path.suffix == ".txt":
            path.write_text("".join(t + "\n" for t in table.column("text").to_pylist()), encoding="utf-8")
        elif path.suffix == ".jsonl":
            import json

            with path.open("w", encoding="utf-8") as out:
                for row in table.drop_columns(["added_at"]).to_pylist():
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            raise BankError(f"cannot export to {path.name!r}: use .jsonl, .txt or .parquet")
        return table.num_rows


class Registry:
    """The memory banks of one store (default: ``$DECAPFLOW_STORE``, else ``<DECAPFLOW_HOME>/banks``)."""

    def __init__(self, uri: Store | str | None = None) -> None:
        self.store = get_store(uri)
        self.uri = self.store.uri
        self.db = self.store.db

    def names(self) -> list[str]:
        names: list[str] = []
        token = None
        while True:  # remote databases answer in pages
            page = self.db.list_tables(page_token=token)
            names += page.tables
            token = page.page_token
            if not token:
                return sorted(n for n in names if not n.startswith("_"))  # '_...': the store's own tables

    def exists(self, name: str) -> bool:
        return check_name(name) in self.names()

    def open(self, ref: str | BankRef) -> MemoryBank:
        """Bank ``ref``: ``NAME`` at its newest version, or ``NAME@TAG`` / ``NAME@vN`` pinned to one version
        (read-only). Raises :class:`UnknownBank` naming the banks there are, :class:`UnknownVersion` naming the
        tags or versions the bank has."""
        ref = BankRef.parse(ref)
        name = ref.name
        if not self.exists(name):
            known = ", ".join(self.names()) or "none yet"
            raise UnknownBank(f"no memory bank named {name!r} in {self.uri} (banks: {known}); "
                            f"create one with: decapflow ingest CORPUS --memory {name}")
        bank = MemoryBank(name, self.db.open_table(name), self.store)
        if not ref.pinned:
            return bank
        checkout_version(bank.table, name, bank.tag_version(ref.tag) if ref.tag is not None else int(ref.version))
        bank.ref = ref
        return bank

    def create(self, name: str, encoder: str, dim: int, exist_ok: bool = False) -> MemoryBank:
        """Create bank ``name`` empty. ``exist_ok``: open it instead when it exists (or another process created
        it a moment ago), checking it was built with ``encoder``."""
        bank = None
        with self.store.creating():  # one creator at a time (LanceDB's create is not atomic)
            if not self.exists(name):
                bank = MemoryBank(name, self.db.create_table(name, schema=bank_schema(dim, encoder)), self.store)
        if bank is not None:  # recorded outside the creators' turn: the history table may need creating too
            history.record(self.store, name, history.Change("create", details={"encoder": encoder, "dim": dim}),
                           version=bank.version, rows=0)
            return bank
        if not exist_ok:
            raise BankError(f"memory bank {name!r} already exists")
        bank = self.open(name)
        bank.check_encoder(encoder, dim)
        return bank

    def open_or_create(self, name: str, encoder: str, dim: int) -> MemoryBank:
        """Open ``name`` (checking it was built with ``encoder``) or create it empty."""
        return self.create(name, encoder, dim, exist_ok=True)

    def drop(self, name: str) -> int:
        """Drop bank ``name``'s table with all its versions; returns how many rows it held. Only the rows: its
        decoders, evaluation sets and image mean belong to higher layers, and
        :func:`decapflow.lifecycle.deletion.delete_bank` deletes the bank with all of them."""
        rows = len(self.open(name))  # raises a clear error when it does not exist
        self.db.drop_table(name)
        return rows


def open_bank(name: str, store: Store | str | None = None) -> MemoryBank:
    """Bank ``name`` of ``store`` (default: ``$DECAPFLOW_STORE``, else ``<DECAPFLOW_HOME>/banks``) at its newest
    version; :meth:`MemoryBank.at` pins another. Raises :class:`UnknownBank`, naming the banks there are."""
    return Registry(store).open(name)

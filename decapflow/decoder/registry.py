"""The decoder registry: which decoders each memory bank has, how they scored, which one is current. No torch.

Decoders live in the bank's store (:mod:`decapflow.bank.store`): files under ``<store>/_decoders/<bank>/<id>/`` and one
record per decoder in the ``_decoders`` table (status, scores per evaluation set, gate decision, parent, bank
version). A decoder exists once its record does: files are uploaded first. Ids look like ``20261127-031500-3fa2c1``
(UTC time, then a hash of the weights).

Statuses: ``challenger`` (registered, not decided), ``promoted`` (was made current at some point), ``rejected``
(lost to the champion). Which decoder is *current* is kept apart, in the ``_current`` table (one row per bank with
the ids that were current before it, for rollback), and changed only under the bank's ``decoders-<bank>`` lock.

Stores read from elsewhere (``s3://...``) are fetched once per decoder into ``<home>/cache/decoders`` (ids are
immutable). Decoders of the old layout (``<home>/decoders/<bank>/``) are moved into the default store on first use.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from decapflow.bank.store import Store, get_store
from decapflow.config import cache_dir, home, store_uri
from decapflow.errors import NoDecoder, UnknownDecoder

__all__ = ["Decoders", "NoDecoder", "UnknownDecoder", "current_decoder", "current_meta", "decoders", "find_decoder",
           "list_decoders", "set_current"]

STATUSES = ("challenger", "promoted", "rejected")
RECORDS = pa.schema([
    ("bank", pa.string()), ("id", pa.string()), ("status", pa.string()), ("created", pa.string()),
    ("updated", pa.string()), ("bank_version", pa.int64()), ("parent", pa.string()), ("encoder", pa.string()),
    ("meta", pa.string()), ("scores", pa.string()), ("decision", pa.string()),
])
POINTERS = pa.schema([("bank", pa.string()), ("decoder", pa.string()), ("history", pa.string()),
                      ("updated", pa.string()), ("reason", pa.string())])
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _check(name: str, what: str) -> str:
    if not name or name[0] in "._-" or not set(name) <= _NAME_CHARS:
        raise UnknownDecoder(f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def utc_now() -> str:
    """UTC time to the microsecond: records sort by it (ids of one second do not)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _sql(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class Decoders:
    """The decoders of every bank in one store."""

    def __init__(self, store: Store | str | None = None) -> None:
        self.store = get_store(store)
        self.store.table("_decoders", RECORDS)  # created when missing
        self.store.table("_current", POINTERS)
        self._migrate_legacy()

    # ------------------------------------------------------------------ reading
    # A fresh table handle per operation (~2 ms): a handle shared between threads was measured to read a version
    # older than one another thread had just committed through it, which a compare-and-swap cannot afford.
    @property
    def records(self) -> Any:
        return self.store.db.open_table("_decoders")

    @property
    def pointers(self) -> Any:
        return self.store.db.open_table("_current")

    def folder(self, bank: str, decoder_id: str) -> str:
        """Where the decoder's files are in the store."""
        return self.store.path("_decoders", _check(bank, "bank name"), _check(decoder_id, "decoder id"))

    def local(self, bank: str, decoder_id: str) -> Path:
        """A local folder with the decoder's files (the store's own folder, or a cached copy of a remote one)."""
        if self.store.local:
            return Path(self.folder(bank, decoder_id))
        return self.store.get_dir(self.folder(bank, decoder_id),
                                  cache_dir() / "decoders" / self.store.key / bank / decoder_id)

    def _rows(self, where: str) -> list[dict[str, Any]]:
        rows = self.records.search().where(where).limit(None).to_list()
        return sorted(rows, key=lambda r: r["created"])

    def record(self, bank: str, decoder_id: str) -> dict[str, Any] | None:
        rows = self._rows(f"bank = {_sql(bank)} AND id = {_sql(decoder_id)}")
        return self._public(rows[0], self.current_id(bank)) if rows else None

    def list(self, bank: str) -> list[dict[str, Any]]:
        """Every decoder of ``bank``, in the order registered: its meta.json plus id, status, scores, decision, current."""
        current = self.current_id(bank)
        return [self._public(r, current) for r in self._rows(f"bank = {_sql(_check(bank, 'bank name'))}")]

    def _public(self, row: dict[str, Any], current: str | None) -> dict[str, Any]:
        return {**json.loads(row["meta"] or "{}"), "bank": row["bank"], "id": row["id"], "status": row["status"],
                "created": row["created"], "updated": row["updated"], "bank_version": row["bank_version"],
                "parent": row["parent"] or None, "scores": json.loads(row["scores"] or "{}"),
                "decision": json.loads(row["decision"] or "null"), "current": row["id"] == current,
                "path": self.folder(row["bank"], row["id"])}

    def pointer(self, bank: str) -> dict[str, Any] | None:
        rows = self.pointers.search().where(f"bank = {_sql(_check(bank, 'bank name'))}").limit(None).to_list()
        return rows[0] if rows else None

    def current_id(self, bank: str) -> str | None:
        row = self.pointer(bank)
        return (row["decoder"] or None) if row else None

    def current(self, bank: str) -> dict[str, Any] | None:
        decoder_id = self.current_id(bank)
        return self.record(bank, decoder_id) if decoder_id else None

    def current_path(self, bank: str) -> Path | None:
        decoder_id = self.current_id(bank)
        return self.local(bank, decoder_id) if decoder_id else None

    def find(self, decoder: str, bank: str) -> tuple[str, str]:
        """(bank, id) of a registered decoder named ``ID`` (``bank``'s own first, then any bank's) or
        ``OTHER_BANK/ID``. Names only, never paths, so a server can take them from its clients."""
        owner, _, decoder_id = decoder.rpartition("/")
        _check(decoder_id, "decoder id")
        if owner:
            _check(owner, "bank name")
        rows = self._rows(f"id = {_sql(decoder_id)}" + (f" AND bank = {_sql(owner)}" if owner else ""))
        rows.sort(key=lambda r: r["bank"] != bank)
        if not rows:
            raise UnknownDecoder(f"no decoder {decoder!r} registered for bank {bank!r}"
                                 f"{'' if owner else ' or any other bank'}; see: decapflow decoder list {owner or bank}")
        return rows[0]["bank"], rows[0]["id"]

    # ------------------------------------------------------------------ writing
    def add(self, bank: str, folder: Path, decoder_id: str, status: str = "challenger") -> str:
        """Upload checkpoint folder ``folder`` as ``bank``'s decoder ``decoder_id`` and record it."""
        meta = json.loads((Path(folder) / "meta.json").read_text())
        if self._rows(f"bank = {_sql(bank)} AND id = {_sql(decoder_id)}"):
            return decoder_id  # the same weights registered twice within a second
        self.store.put_dir(Path(folder), self.folder(bank, decoder_id))
        row = {"bank": bank, "id": decoder_id, "status": status, "created": utc_now(),
               "updated": utc_now(), "bank_version": meta.get("bank_version"), "parent": meta.get("parent") or "",
               "encoder": meta.get("encoder") or "", "meta": json.dumps(meta, default=str), "scores": "{}",
               "decision": "null"}
        self.records.add(pa.Table.from_pylist([row], schema=RECORDS))
        return decoder_id

    def update(self, bank: str, decoder_id: str, *, status: str | None = None,
               scores: dict[str, Any] | None = None, decision: dict[str, Any] | None = None) -> None:
        """Change a record's status, merge ``scores`` (by evaluation set) into its scores, or set its decision.
        Under the bank's lock: two LanceDB updates of one table at once can fail on a commit conflict."""
        with self.store.lock(f"decoders-{bank}"):
            self._update(bank, decoder_id, status=status, scores=scores, decision=decision)

    def _update(self, bank: str, decoder_id: str, *, status: str | None = None,
                scores: dict[str, Any] | None = None, decision: dict[str, Any] | None = None) -> None:
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        row = self.record(bank, decoder_id)
        if row is None:
            raise UnknownDecoder(f"bank {bank!r} has no decoder {decoder_id!r}")
        values: dict[str, Any] = {"updated": utc_now()}
        if status is not None:
            values["status"] = status
        if scores is not None:
            values["scores"] = json.dumps({**row["scores"], **scores})
        if decision is not None:
            values["decision"] = json.dumps(decision, default=str)
        self.records.update(where=f"bank = {_sql(bank)} AND id = {_sql(decoder_id)}", values=values)

    def set_current(self, bank: str, decoder_id: str, *, expected: str | None | bool = True,
                    reason: str = "") -> bool:
        """Make ``decoder_id`` ``bank``'s current decoder, remembering the one before it for :meth:`rollback`.

        ``expected``: when a str or None, swap only if that is still the current id (what a gate compared
        against) and return False otherwise; True swaps unconditionally."""
        if self.record(bank, decoder_id) is None:
            known = [d["id"] for d in self.list(bank)]
            raise UnknownDecoder(f"bank {bank!r} has no decoder {decoder_id!r}; registered: {known}")
        with self.store.lock(f"decoders-{bank}") as lease:
            row = self.pointer(bank)
            current = (row["decoder"] or None) if row else None
            if expected is not True and current != expected:
                return False
            if current == decoder_id:
                return True
            history = json.loads(row["history"]) if row else []
            history = ([*history, current] if current else history)[-20:]
            lease.check()  # a holder that stalled past its lease and lost it must not swap the pointer
            self._write_pointer(bank, decoder_id, history, reason, exists=row is not None)
            self._update(bank, decoder_id, status="promoted")
        return True

    def rollback(self, bank: str) -> str:
        """Make the decoder that was current before the current one current again; returns its id."""
        with self.store.lock(f"decoders-{bank}") as lease:
            row = self.pointer(bank)
            history = json.loads(row["history"]) if row else []
            if not history:
                raise NoDecoder(f"bank {bank!r} has no earlier decoder to roll back to")
            previous = history.pop()
            lease.check()
            self._write_pointer(bank, previous, history, f"rollback from {row['decoder']}", exists=True)
        return previous

    def _write_pointer(self, bank: str, decoder_id: str, history: list[str], reason: str, exists: bool) -> None:
        values = {"bank": bank, "decoder": decoder_id, "history": json.dumps(history), "updated": utc_now(),
                  "reason": reason}
        if exists:
            self.pointers.update(where=f"bank = {_sql(bank)}", values=values)
        else:
            self.pointers.add(pa.Table.from_pylist([values], schema=POINTERS))

    def prune(self, bank: str, keep_rejected: int = 5, keep_promoted: int = 5) -> list[str]:
        """Delete old decoders: keep the current one, the ones rollback can reach, the newest ``keep_promoted``
        promoted and ``keep_rejected`` rejected ones, and every undecided challenger. Returns the ids deleted."""
        with self.store.lock(f"decoders-{bank}"):
            row = self.pointer(bank)
            keep = set(json.loads(row["history"])[-keep_promoted:] + [row["decoder"]]) if row else set()
            rows = self._rows(f"bank = {_sql(bank)}")
            by_status = {s: [r["id"] for r in rows if r["status"] == s and r["id"] not in keep] for s in STATUSES}
            drop = (by_status["rejected"][: max(0, len(by_status["rejected"]) - keep_rejected)]
                    + by_status["promoted"][: max(0, len(by_status["promoted"]) - keep_promoted)])
            for decoder_id in drop:
                self.records.delete(f"bank = {_sql(bank)} AND id = {_sql(decoder_id)}")
                self.store.remove_dir(self.folder(bank, decoder_id))
        return drop

    def drop_bank(self, bank: str) -> int:
        """Forget every decoder of ``bank`` (records, current pointer, files), e.g. with the bank itself."""
        with self.store.lock(f"decoders-{bank}"):
            count = len(self._rows(f"bank = {_sql(_check(bank, 'bank name'))}"))
            self.records.delete(f"bank = {_sql(bank)}")
            self.pointers.delete(f"bank = {_sql(bank)}")
            self.store.remove_dir(self.store.path("_decoders", bank))
        return count

    # ------------------------------------------------------------------ the old layout
    def _migrate_legacy(self) -> None:
        """Move ``<home>/decoders/<bank>/<id>/`` (decapflow <= 0.8) into the default store, once."""
        legacy = home() / "decoders"
        if not legacy.is_dir() or (legacy / "MIGRATED").exists() or self.store.uri != store_uri(None):
            return
        with self.store.lock("migrate-decoders"):
            if (legacy / "MIGRATED").exists():
                return
            for bank_dir in sorted(p for p in legacy.iterdir() if p.is_dir() and not p.name.startswith(".")):
                marker = bank_dir / "current"
                current = marker.read_text().strip() if marker.is_file() else None
                for folder in sorted(p for p in bank_dir.iterdir() if (p / "model.safetensors").is_file()):
                    self.add(bank_dir.name, folder, folder.name, status="promoted")
                if current and (bank_dir / current).is_dir():
                    self.set_current(bank_dir.name, current, reason="moved from the old layout")
            (legacy / "MIGRATED").write_text(f"moved into {self.store.uri}; this folder is safe to delete\n")


_BY_STORE: dict[str, Decoders] = {}


def decoders(store: Store | str | None = None) -> Decoders:
    """The (cached, per process) :class:`Decoders` of a store."""
    key = get_store(store).uri
    if key not in _BY_STORE:
        _BY_STORE[key] = Decoders(store)
    return _BY_STORE[key]


# Shorthands over the default store (or ``store``) for callers that need one answer.
def current_decoder(bank: str, store: Store | str | None = None) -> Path | None:
    """The local folder of ``bank``'s current decoder, or None when it has none."""
    return decoders(store).current_path(bank)


def current_meta(bank: str, store: Store | str | None = None) -> dict[str, Any] | None:
    """The record of ``bank``'s current decoder (its meta.json, id, status, scores), or None."""
    return decoders(store).current(bank)


def find_decoder(decoder: str, bank: str, store: Store | str | None = None) -> Path:
    """The local folder of a registered decoder named ``ID`` or ``BANK/ID`` (see :meth:`Decoders.find`)."""
    reg = decoders(store)
    return reg.local(*reg.find(decoder, bank))


def list_decoders(bank: str, store: Store | str | None = None) -> list[dict[str, Any]]:
    return decoders(store).list(bank)


def set_current(bank: str, decoder_id: str, store: Store | str | None = None) -> None:
    """Make ``decoder_id`` ``bank``'s current decoder (by hand: no gate)."""
    decoders(store).set_current(bank, decoder_id, reason="set by hand")

"""Decoders that learnt sentences the bank no longer holds ("trained on 37 rows since removed").

A decoder records the bank version it trained on (``bank_version``). Its *stale rows* are the rows of that version
that the bank's newest version lacks: removed since, or gone with a restore. Counting them needs the old version's
hashes, and maintenance may clean that version up later, so the counts are taken when rows leave (a removal, a
restore) and kept in that change's history entry (``details.stale``: decoder id -> rows). A removal adds the
removed rows that the decoder's version held; a restore counts afresh. :func:`stale_rows` reads the newest counts;
a decoder trained after them on an older version (``train --memory BANK@v12``) is counted when asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from decapflow.bank import history
from decapflow.bank.memory import MemoryBank, Registry
from decapflow.bank.store import Store, get_store
from decapflow.bank.versions import count_present, hashes_at
from decapflow.decoder.registry import decoders
from decapflow.errors import UnknownVersion

__all__ = ["after_removal", "after_restore", "stale_rows"]

ROW_CHANGES = ("remove", "restore")


def _latest_counts(store: Store, bank: str) -> tuple[dict[str, int], int]:
    """The newest stale counts recorded for ``bank`` and the version that change made (0: none yet)."""
    for entry in reversed(history.history(store, bank, current=True)):
        if entry["op"] in ROW_CHANGES and "stale" in entry["details"]:
            return dict(entry["details"]["stale"]), int(entry["version"])
    return {}, 0


def _trained(bank: str, store: Store) -> list[tuple[str, int]]:
    return [(d["id"], int(d["bank_version"])) for d in decoders(store).list(bank) if d.get("bank_version") is not None]


def after_removal(bank: MemoryBank, removed: Sequence[str]) -> dict[str, int]:
    """Each decoder's stale rows once ``removed`` (hashes, not yet deleted from ``bank``'s newest version) are
    gone: its earlier count plus how many of them its version held. A version cleaned up since counts none of
    them (the count is then a lower bound)."""
    store = get_store(bank.store)
    counts, _ = _latest_counts(store, bank.name)
    held: dict[int, int] = {}
    out: dict[str, int] = {}
    for decoder_id, version in _trained(bank.name, store):
        if version not in held:
            try:
                held[version] = count_present(bank, version, removed)
            except UnknownVersion:
                held[version] = 0
        out[decoder_id] = int(counts.get(decoder_id, 0)) + held[version]
    return out


def after_restore(bank: MemoryBank) -> dict[str, int]:
    """Each decoder's stale rows against ``bank``'s newest version, counted afresh (its version's hashes that the
    bank lacks now); a decoder whose version was cleaned up keeps its earlier count."""
    store = get_store(bank.store)
    counts, _ = _latest_counts(store, bank.name)
    now = hashes_at(bank)
    by_version: dict[int, int] = {}
    out: dict[str, int] = {}
    for decoder_id, version in _trained(bank.name, store):
        if version not in by_version:
            try:
                then = hashes_at(bank, version)
                by_version[version] = int(pc.sum(pc.invert(pc.is_in(then, value_set=now))).as_py() or 0)
            except UnknownVersion:
                by_version[version] = -1
        out[decoder_id] = by_version[version] if by_version[version] >= 0 else int(counts.get(decoder_id, 0))
    return out


def stale_rows(bank: MemoryBank, store: Store | str | None = None) -> dict[str, dict[str, Any]]:
    """Per decoder of ``bank`` with stale rows: ``{"rows": n, "since": version of the change that counted them}``.
    A decoder trained after the newest count on an older version than it is counted now."""
    store = get_store(store if store is not None else bank.store)
    counts, since = _latest_counts(store, bank.name)
    out = {d: {"rows": n, "since": since} for d, n in counts.items() if n}
    if not since:
        return out
    now: pa.Array | None = None
    for decoder_id, version in _trained(bank.name, store):
        if decoder_id in counts or version >= since:
            continue
        try:
            now = hashes_at(Registry(store).open(bank.name) if bank.pinned else bank) if now is None else now
            n = int(pc.sum(pc.invert(pc.is_in(hashes_at(bank, version), value_set=now))).as_py() or 0)
        except UnknownVersion:
            continue
        if n:
            out[decoder_id] = {"rows": n, "since": since}
    return out

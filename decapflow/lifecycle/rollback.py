"""Rolling a bank back and pinning versions (``decapflow memory restore`` and ``memory tag``).

A restore makes a new version equal to an earlier one (LanceDB's restore: nothing is rewritten), under the bank's
lease, so ingests wait for it and their next chunk lands on the restored rows; an ingest that was running when the
restore happened writes again, when it ends, what the restore took out of its file (see
:func:`decapflow.bank.ingest.run_ingest`). Like a removal, a restore can take rows away: decoders are marked
(:mod:`decapflow.lifecycle.stale`), sentences gone leave the text evaluation set, and a ``decapflow.bank.restored``
event reaches the retrain deployment.

Tags pin a version by name: readers take ``BANK@TAG`` (a server follows the tag when it moves) and clean-up keeps
tagged versions.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from decapflow.bank import events, history
from decapflow.bank.memory import MemoryBank, Registry
from decapflow.bank.refs import CLONE_PIN, BankRef, writable
from decapflow.bank.store import Store, get_store
from decapflow.bank.versions import delete_tag, hashes_at, restore_version, set_tag
from decapflow.errors import BankError
from decapflow.lifecycle.evalsets import drop_eval_sentences, eval_sets
from decapflow.lifecycle.stale import after_restore

__all__ = ["list_tags", "remove_tag", "restore", "tag"]


def _bank(name: str, store: Store | str | None, command: str) -> MemoryBank:
    return Registry(store).open(writable(name, command))


def restore(bank_name: str, *, version: int | None = None, tag: str | None = None,
            store: Store | str | None = None) -> dict[str, Any]:
    """Make a new version of ``bank_name`` equal to ``version`` or to the version ``tag`` pins (exactly one).
    Returns the restore (version restored, new version, rows, rows back and gone), the decoders' stale rows, the
    evaluation sets recorded again, whether the event went, seconds."""
    start = time.perf_counter()
    if (version is None) == (tag is None):
        raise BankError("give the version to restore (--version N) or a tag (--tag NAME), one of them")
    store = get_store(store)
    bank = _bank(bank_name, store, "memory restore")
    target = bank.tag_version(tag) if tag is not None else int(version)
    if target == bank.version:
        raise BankError(f"bank {bank.name!r} is at version {target} already; nothing to restore")
    change = history.Change("restore", details={"tag": tag} if tag else {})
    done = restore_version(bank, target, change)
    stale = after_restore(bank)
    now = hashes_at(bank)
    held = [h for s in eval_sets(bank.name, store) if s.kind == "text" for h in s.hashes]
    gone = pc.invert(pc.is_in(pa.array(held, pa.string()), value_set=now)).to_pylist() if held else []
    replaced = drop_eval_sentences(bank, [h for h, g in zip(held, gone, strict=True) if g], store)
    history.record(store, bank.name, history.Change("restore", op_id=change.op_id), version=done.version,
                   rows=done.rows, details={"stale": stale, "eval_sets": replaced})
    event = events.bank_rows_left("restored", bank.name, {**done.to_dict(), "stale_decoders": {
        d: n for d, n in stale.items() if n}})
    return {"bank": bank.name, **done.to_dict(), "tag": tag, "stale": stale, "eval_sets": replaced,
            "event": event, "seconds": round(time.perf_counter() - start, 3)}


def tag(bank_ref: str, name: str, *, version: int | None = None, store: Store | str | None = None
        ) -> dict[str, Any]:
    """Point tag ``name`` at ``version`` (default: the version ``bank_ref`` names, the newest for a plain name):
    created, or moved when it exists. Returns bank, tag, version and the version it pinned before."""
    bank = Registry(store).open(bank_ref)
    ref = BankRef.parse(bank_ref)
    if version is not None and ref.pinned and version != bank.version:
        raise BankError(f"{bank_ref!r} names version {bank.version}, --version says {version}: give one")
    pinned, previous = set_tag(Registry(store).open(bank.name), name, bank.version if version is None else version)
    return {"bank": bank.name, "tag": name, "version": pinned, "previous": previous}


def remove_tag(bank_name: str, name: str, *, store: Store | str | None = None) -> dict[str, Any]:
    """Delete tag ``name`` (its version becomes eligible for clean-up after the retention)."""
    if name.startswith(CLONE_PIN):
        raise BankError(f"tag {name!r} pins the files of a shallow clone; delete the clone instead "
                        f"(decapflow memory rm {name.removeprefix(CLONE_PIN)})")
    bank = _bank(bank_name, store, "memory tag --delete")
    return {"bank": bank.name, "tag": name, "version": delete_tag(bank, name)}


def list_tags(bank_name: str, *, store: Store | str | None = None) -> list[dict[str, Any]]:
    """The bank's tags: name, version, rows at that version; clone pins say which clone."""
    bank = Registry(store).open(BankRef.parse(bank_name).name)
    rows = {v["version"]: v["rows"] for v in bank.versions()}
    return [{"tag": t, "version": v, "rows": rows.get(v),
             **({"clone": t.removeprefix(CLONE_PIN)} if t.startswith(CLONE_PIN) else {})}
            for t, v in bank.tags().items()]

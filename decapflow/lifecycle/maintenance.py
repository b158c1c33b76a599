"""Maintenance of a bank, or of a whole store: compaction, old versions removed after a retention (tagged ones kept),
the ANN index brought up to date, and the store's own tables kept small too. What ``decapflow memory maintain``
and the ``nightly-maintenance`` deployment run.

Every bank is maintained, whether :func:`~decapflow.bank.maintenance.health` says it needs it or not: a bank with
nothing to do costs one LanceDB ``optimize`` that commits nothing (measured: no new version, 0.02-0.04 s on small
banks; a ``maintain`` row in its history), while skipping one would leave behind what health's thresholds tolerate
(a few small fragments, fewer than 20 versions past the retention), which then piles up until it trips them. The store's ``_lock-*`` tables are left alone:
:meth:`~decapflow.bank.store.Store.lock` cleans them up as it goes, and they change on every lease renewal.

A retention is written ``7d``, ``12h``, ``30m``, ``45s``, ``2w`` or ``0`` (:func:`parse_retention`).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from decapflow.bank.maintenance import DEFAULT_RETAIN, format_retention, health, optimize_bank, optimize_table
from decapflow.bank.memory import Registry
from decapflow.bank.refs import writable
from decapflow.bank.store import Store, get_store
from decapflow.errors import BankError

__all__ = ["DEFAULT_RETAIN", "maintain_bank", "maintain_store", "maintain_tables", "parse_retention", "store_tables",
           "summary_line"]

_RETENTION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}


def parse_retention(text: str | int | float | timedelta) -> timedelta:
    """``"7d"`` -> 7 days; also ``12h``, ``30m``, ``45s``, ``2w``, and ``0`` (keep only the newest version). A
    :class:`~datetime.timedelta` passes through; a number without a unit is refused unless it is 0 (seconds? days?)."""
    if isinstance(text, timedelta):
        if text < timedelta(0):
            raise BankError(f"a retention cannot be negative ({text})")
        return text
    match = _RETENTION.match(str(text).lower())
    if match is None or (not match.group(2) and int(match.group(1)) != 0):
        raise BankError(f"invalid retention {text!r}: a whole number and a unit, s, m, h, d or w (7d, 12h, 30m), "
                        f"or 0 to keep only the newest version")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2) or "s"])


def maintain_bank(name: str, retain: str | timedelta = DEFAULT_RETAIN, store: Store | str | None = None
                  ) -> dict[str, Any]:
    """Maintain bank ``name`` (a plain name: a pinned ``NAME@TAG`` is read-only): compact, remove versions older than
    ``retain`` except tagged ones, add unindexed rows to its ANN index, under the bank's lease (an ingest waits
    between two chunks; readers never wait). Returns what it did (:class:`~decapflow.bank.maintenance.Optimized`'s
    fields, ``mb_freed``, ``retain``) with what :func:`~decapflow.bank.maintenance.health` said before
    (``needs_before``) and says now (``needs``, ``health``)."""
    delta = parse_retention(retain)
    registry = Registry(get_store(store))
    bank = registry.open(writable(name, "memory maintain"))
    before = health(bank, delta)
    done = optimize_bank(bank, delta)
    after = health(bank, delta)
    result = {k: v for k, v in done.to_dict().items() if k != "details"}
    return {**result, "retain": format_retention(delta), "mb_freed": round(done.bytes_freed / 1e6, 3),
            "needs_before": before["needs"], "needs": after["needs"], "health": after}


def store_tables(store: Store) -> list[str]:
    """The store's own tables that maintenance optimizes: every ``_``-table but the leases' (``_lock-*``)."""
    names: list[str] = []
    token = None
    while True:  # remote databases answer in pages
        page = store.db.list_tables(page_token=token)
        names += page.tables
        token = page.page_token
        if not token:
            break
    return sorted(n for n in names if n.startswith("_") and not n.startswith("_lock-"))


def maintain_tables(store: Store | str | None = None, retain: str | timedelta = DEFAULT_RETAIN
                    ) -> list[dict[str, Any]]:
    """Optimize the store's own tables (:func:`store_tables`) with the same retention as the banks; one that fails
    is reported (``error``), the others still run."""
    delta = parse_retention(retain)
    store = get_store(store)
    done: list[dict[str, Any]] = []
    for table in store_tables(store):
        try:
            done.append(optimize_table(store, table, delta))
        except Exception as error:  # noqa: BLE001 - one table's failure must not stop the others
            done.append({"table": table, "error": f"{type(error).__name__}: {error}"})
    return done


def maintain_store(store: Store | str | None = None, retain: str | timedelta = DEFAULT_RETAIN,
                   banks: list[str] | None = None, tables: bool = True) -> dict[str, Any]:
    """Maintain every bank of ``store`` (or ``banks``), one after another, then the store's own tables
    (:func:`store_tables`; ``tables=False`` leaves them). A bank that fails is reported (``error``) and the others
    still run. Returns ``{"store", "retain", "banks": [per bank: maintain_bank's dict, or {"bank", "error"}],
    "tables": [...], "failed": [names], "mb_freed"}``."""
    delta = parse_retention(retain)  # bad input fails before anything runs
    store = get_store(store)
    names = list(banks) if banks else Registry(store).names()
    results: list[dict[str, Any]] = []
    for name in names:
        try:
            results.append(maintain_bank(name, delta, store))
        except Exception as error:  # noqa: BLE001 - one bank's failure must not stop the others
            results.append({"bank": name, "error": f"{type(error).__name__}: {error}"})
    done_tables = maintain_tables(store, delta) if tables else []
    failed = [r["bank"] for r in results if "error" in r] + [t["table"] for t in done_tables if "error" in t]
    freed = sum(r.get("bytes_freed", 0) for r in [*results, *done_tables])
    return {"store": store.uri, "retain": format_retention(delta), "banks": results, "tables": done_tables,
            "failed": failed, "mb_freed": round(freed / 1e6, 3)}


def _unindexed(before: int | None, after: int | None) -> str:
    if before is None and after is None:
        return "no ANN index"
    return f"unindexed rows {'-' if before is None else f'{before:,}'} -> {'-' if after is None else f'{after:,}'}"


def summary_line(result: dict[str, Any]) -> str:
    """One line for a person (the CLI, a flow's log) from :func:`maintain_bank`'s or :func:`optimize_table`'s dict."""
    what = f"bank {result['bank']!r}" if "bank" in result else f"table {result['table']}"
    if "error" in result:
        return f"{what}: FAILED: {result['error']}"
    line = (f"{what}: {result['versions_removed']:,} old version{'s' * (result['versions_removed'] != 1)} removed, "
            f"{result['bytes_freed'] / 1e6:,.1f} MB freed, fragments {result['fragments_before']:,} -> "
            f"{result['fragments']:,}, disk {result['bytes_before'] / 1e6:,.1f} -> {result['bytes'] / 1e6:,.1f} MB")
    if "bank" in result:
        line += f", {_unindexed(result['unindexed_before'], result['unindexed'])}"
    return line + f", {result['seconds']:.2f} s"

"""Keeping a bank fast and small on disk: compaction, clean-up of old versions, the ANN index brought up to date.

A bank fed by many small ingests piles up versions, fragments and files, and reading it slows down with them
(measured: 200 ingests of 50 sentences, 7,851 rows, read its vectors 8.4x slower than the same rows ingested once).
:func:`optimize_bank` runs LanceDB's ``optimize`` (compaction, then clean-up of versions older than the retention
except tagged ones, then rows written since the ANN index was built added to it) under the bank's lease, so it never
runs beside a writer of the same bank; readers never wait (they read versions, which clean-up keeps for the
retention). :func:`health` says whether a bank needs it; :func:`optimize_table` does the same for the store's own
tables (``_history``, ``_decoders``...).

When a bank needs it (:func:`health`'s thresholds, from measurements on this machine with LanceDB 0.41):

- small fragments: every write is a fragment, and a full read pays about 0.7 ms per fragment, as much as reading
  ~250 rows (200 ingests of 50 sentences, 9,362 rows: 168 ms to read its vectors in 200 fragments, 25 ms in one).
  A bank needs compacting when its fragments smaller than LanceDB's compaction target would add more than 10% to a
  full read (small x 250 > rows / 10), and there are at least 8 of them (a few are the normal tails of ingests:
  one ingest of 9,362 rows leaves 3). A bank ingested in 4,096-row chunks never trips it (4096 rows per fragment).
- rows written since the ANN index was built: each is compared exactly on every ANN query, beside the index's own
  probed partitions (measured twice on 100k rows, IVF_FLAT, 20 probes, a shared 2-core machine: 8.8-10.0 ms a query
  with every row indexed; 11.1-12.7 ms with 5% more unindexed, 13.4-13.5 ms with 10%, 14.4-16.5 ms with 20%).
  Needed from 5% of the rows on.
- versions past the retention, not tagged: each keeps its manifest (a list of all the version's fragments; the
  manifests of 200 small ingests took 2.7 MB beside 5.2 MB of rows) and the files only it still uses (fragments
  that compaction or a delete rewrote). Needed from 20 on (LanceDB's own rule of thumb: optimize after about 20
  changes), or from 1 when the bank's folder holds more than 1.2x its current rows' bytes and index.
- deleted rows still stored (a delete marks rows; a read skips them, the bytes stay): needed from 10% of the rows,
  LanceDB's share for rewriting a fragment.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow.fs as pafs

from decapflow.bank import history
from decapflow.bank.memory import MemoryBank
from decapflow.bank.store import Store

__all__ = ["DEFAULT_RETAIN", "Optimized", "disk_bytes", "format_retention", "health", "optimize_bank", "optimize_table",
           "versions_past"]

#: LanceDB's retryable commit conflicts (a writer outside decapflow's leases, e.g. a second optimize): tries.
CONFLICT_TRIES = 5
#: How long old versions are kept unless told otherwise (Delta Lake's and Iceberg's default too).
DEFAULT_RETAIN = timedelta(days=7)
# Thresholds of health() (see the module's docstring for the measurements behind them).
FRAGMENT_COST_ROWS = 250  # a fragment costs a full read about as much as this many rows
SMALL_FRAGMENTS_MIN = 8  # fewer small fragments than this never need compacting
READ_OVERHEAD_MAX = 0.10  # small fragments may add this share to a full read
UNINDEXED_SHARE_MAX = 0.05  # rows outside the ANN index, as a share of the rows
VERSIONS_PAST_MAX = 20  # versions past the retention
DISK_OVERHEAD_MAX = 1.2  # the folder's bytes over the current rows' and index's, before old versions count at once
DELETED_SHARE_MAX = 0.10  # deleted rows still stored, as a share of all stored rows


def disk_bytes(store: Store, name: str) -> int:
    """Bytes of every file under the bank's folder (``<store>/<name>.lance``), all versions and indexes included.
    A shallow clone's folder holds only its own files: the ones it shares stay in its source's."""
    root = store.path(f"{name}.lance")
    if not store.exists(root):
        return 0
    infos = store.fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)


@dataclass
class Optimized:
    """What :func:`optimize_bank` did."""

    bank: str
    version_before: int
    version: int
    fragments_before: int
    fragments: int
    versions_before: int
    versions: int
    bytes_before: int
    bytes: int
    unindexed_before: int | None
    unindexed: int | None
    seconds: float
    retain_s: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def versions_removed(self) -> int:
        return max(0, self.versions_before - self.versions)

    @property
    def bytes_freed(self) -> int:
        return max(0, self.bytes_before - self.bytes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "versions_removed": self.versions_removed, "bytes_freed": self.bytes_freed}


def _unindexed(table: Any) -> int | None:
    for index in table.list_indices():
        if "vector" in getattr(index, "columns", []):
            stats = table.index_stats(index.name)
            return int(stats.num_unindexed_rows) if stats is not None else None
    return None


def _conflict(error: Exception) -> bool:
    return "onflict" in str(error) or "concurrent transaction" in str(error)


def _optimize(table: Any, retain: timedelta, **kwargs: Any) -> None:
    """``table.optimize`` with LanceDB's retryable commit conflicts retried (each try starts from the newest
    version; a compaction that lost its commit leaves its files to a later clean-up). A retention of 0 is asked for
    on purpose here, so LanceDB's warning about it is not repeated."""
    for attempt in range(CONFLICT_TRIES):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"optimize\(cleanup_older_than=0\)")
                table.optimize(cleanup_older_than=retain, **kwargs)
            return
        except Exception as error:  # noqa: BLE001 - lance names no class for it
            if not _conflict(error) or attempt == CONFLICT_TRIES - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
            table.checkout_latest()


def optimize_bank(bank: MemoryBank, retain: timedelta = timedelta(days=7), *, materialize_all: bool = False,
                  delete_unverified: bool = False, change: history.Change | None = None) -> Optimized:
    """Compact ``bank``'s small fragments (and those with deleted rows: ``materialize_all`` rewrites every
    fragment holding a deleted row, whatever its share), remove versions older than ``retain`` except tagged
    ones, and add rows written since the ANN index was built to it, under the bank's lease; recorded in the
    history (``change``, default ``maintain``). ``delete_unverified`` also removes files no commit names (left
    by a killed writer), safe only while no writer runs: the lease ensures that for decapflow's own writers."""
    store = bank.store
    start = time.perf_counter()
    options = {"materialize_deletions_threshold": 0.0} if materialize_all else None
    with store.lock(f"bank-{bank.name}") as lease:
        table = store.db.open_table(bank.name)
        before = (int(table.version), int(table.stats()["fragment_stats"]["num_fragments"]),
                  len(table.list_versions()), disk_bytes(store, bank.name), _unindexed(table))
        lease.check()
        _optimize(table, retain, delete_unverified=delete_unverified, compaction_options=options)
        table.checkout_latest()
        result = Optimized(bank.name, before[0], int(table.version), before[1],
                           int(table.stats()["fragment_stats"]["num_fragments"]), before[2], len(table.list_versions()),
                           before[3], disk_bytes(store, bank.name), before[4], _unindexed(table),
                           round(time.perf_counter() - start, 3), retain.total_seconds())
        history.record(store, bank.name, change or history.Change("maintain"), version=result.version,
                       rows=int(table.count_rows()),
                       details={k: v for k, v in result.to_dict().items() if k not in ("bank", "details")})
    bank.table.checkout_latest()
    return result


def optimize_table(store: Store, name: str, retain: timedelta = DEFAULT_RETAIN, materialize_all: bool = False
                   ) -> dict[str, Any]:
    """Optimize one of the store's own tables (``_history``, ``_decoders``, ``_current``, ``_evalsets``): compact
    (``materialize_all``: rewriting every fragment with a deleted row, as a purge must), remove versions older than
    ``retain``. Their writers hold per-bank leases, not one for the table, so this takes
    none: a concurrent append or update wins any conflict (LanceDB retries those) and the compaction is retried.
    Returns what it did, in :class:`Optimized`'s terms."""
    start = time.perf_counter()
    table = store.db.open_table(name)
    before = (int(table.stats()["fragment_stats"]["num_fragments"]), len(table.list_versions()),
              disk_bytes(store, name))
    _optimize(table, retain, compaction_options={"materialize_deletions_threshold": 0.0} if materialize_all else None)
    table.checkout_latest()
    after = (int(table.stats()["fragment_stats"]["num_fragments"]), len(table.list_versions()),
             disk_bytes(store, name))
    return {"table": name, "fragments_before": before[0], "fragments": after[0], "versions_before": before[1],
            "versions": after[1], "versions_removed": max(0, before[1] - after[1]), "bytes_before": before[2],
            "bytes": after[2], "bytes_freed": max(0, before[2] - after[2]),
            "seconds": round(time.perf_counter() - start, 3)}


def _past(versions: list[dict[str, Any]], tagged: set[int], retain: timedelta, now: datetime | None) -> int:
    now = now or datetime.now(timezone.utc)
    old = 0
    for v in versions[:-1]:
        stamp = v["timestamp"].astimezone(timezone.utc)  # LanceDB gives local time without a zone
        if now - stamp > retain and int(v["version"]) not in tagged:
            old += 1
    return old


def versions_past(bank: MemoryBank, retain: timedelta, now: datetime | None = None) -> int:
    """How many of ``bank``'s versions are older than ``retain``, not tagged and not the newest: what the next
    clean-up would remove."""
    return _past(bank.table.list_versions(), set(bank.tags().values()), retain, now)


def format_retention(retain: timedelta) -> str:
    """``timedelta(days=7)`` -> ``"7d"``, ``timedelta(hours=36)`` -> ``"36h"``, ``timedelta(0)`` -> ``"0"``."""
    seconds = int(retain.total_seconds())
    if seconds == 0:
        return "0"
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def health(bank: MemoryBank, retain: timedelta = DEFAULT_RETAIN, now: datetime | None = None) -> dict[str, Any]:
    """What maintenance would find in ``bank`` (its newest version, whatever version ``bank`` is pinned to): rows,
    fragments and the small ones (under LanceDB's compaction target), deleted rows still stored, the ANN index and
    rows written since it was built, versions kept, past ``retain`` (not tagged) and tagged, bytes on disk and of the
    current rows; ``needs``: plain-English reasons to run ``decapflow memory maintain`` (empty: the bank is fine).
    Thresholds: see the module's docstring. Reads the table's statistics and lists the bank's folder (no rows)."""
    table = bank.store.db.open_table(bank.name) if bank.store is not None else bank.table
    stats = table.stats()
    fragment_stats = stats["fragment_stats"]
    rows, deleted = int(stats["num_rows"]), int(stats["num_deleted_rows"])
    fragments, small = int(fragment_stats["num_fragments"]), int(fragment_stats["num_small_fragments"])
    versions = table.list_versions()
    tags = {name: int(info["version"]) for name, info in table.tags.list().items()}
    past = _past(versions, set(tags.values()), retain, now)
    unindexed = _unindexed(table)
    index = MemoryBank(bank.name, table, bank.store).index_kind()
    disk = disk_bytes(bank.store, bank.name) if bank.store is not None else None
    data = int(stats["total_bytes"])
    index_bytes = _index_bytes(bank.store, bank.name) if bank.store is not None and index else 0
    when = format_retention(retain)
    needs: list[str] = []
    if small >= SMALL_FRAGMENTS_MIN and small * FRAGMENT_COST_ROWS > READ_OVERHEAD_MAX * max(rows, 1):
        needs.append(f"{small:,} small fragments (one per small write): reading the bank pays for each; compaction "
                     f"merges them")
    if unindexed is not None and unindexed > UNINDEXED_SHARE_MAX * rows:
        needs.append(f"{unindexed:,} rows written since the ANN index was built ({unindexed / max(rows, 1):.1%}): "
                     f"searched exactly on every ANN query until added to the index")
    heavy = disk is not None and disk > DISK_OVERHEAD_MAX * (data + index_bytes)
    if past >= VERSIONS_PAST_MAX or (past and heavy):
        held = f"; the folder holds {disk / 1e6:,.1f} MB for {(data + index_bytes) / 1e6:,.1f} MB of current rows " \
               f"and index" if heavy else ""
        needs.append(f"{past:,} versions older than the retention ({when}), not tagged, still on disk{held}")
    if deleted > DELETED_SHARE_MAX * (rows + deleted):
        needs.append(f"{deleted:,} deleted rows still stored ({deleted / (rows + deleted):.0%} of the stored rows): "
                     f"every read skips them")
    return {"bank": bank.name, "version": int(table.version), "rows": rows, "fragments": fragments,
            "small_fragments": small, "deleted_rows": deleted, "index": index, "unindexed_rows": unindexed,
            "versions": len(versions), "versions_past_retention": past, "retain": when,
            "tagged_versions": len(set(tags.values())), "tags": dict(sorted(tags.items())), "disk_bytes": disk,
            "data_bytes": data, "index_bytes": index_bytes, "needs": needs}


def _index_bytes(store: Store, name: str) -> int:
    """Bytes under the bank's ``_indices`` folder (every index version kept; the current one is the bulk of it)."""
    root = store.path(f"{name}.lance", "_indices")
    if not store.exists(root):
        return 0
    infos = store.fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)
